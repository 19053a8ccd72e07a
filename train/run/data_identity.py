"""What the data is, not where it lies: the `data.content` entry of a run's identity
(train/run/identity.py), so that a relative or an absolute `data.root`, or a copy of the same files
on a node-local disk, is the same run, and a file added or removed is another.

- imagefolder: the class folders and image files of each split, by path relative to
  `data.root` and size (the bytes are not read), hashed; a listing, no image opened.
- mnist, fashion_mnist: each IDX file's header (the counts and image size it declares; the
  file's length follows from it, and the data checks refuse a file that disagrees).
- cifar10: the number of images in each batch file.
- synthetic and python: nothing here, the config already says what the data is
  (`data.synthetic.*`, the seed; `data.factory`).

A file of a torchvision dataset that is not there yet counts as the published one: the launcher
decides the run folder before it downloads, and the downloaded files must name the same run.
Within one process the answer is kept while the folders' modification times stay the same
(adding, removing or renaming a file changes its folder's time; a file rewritten in place with
another size is seen by the next process).
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Any

from common.schema import DataConfig

CONTENT_KEY = "data.content"  # its name in a run's identity (not a config key)

# What torchvision's ImageFolder reads (train/data/imagefolder.py takes them from here).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# The published IDX files of MNIST and Fashion-MNIST, by the sizes their headers declare.
_IDX_FOLDERS = {"mnist": "MNIST/raw", "fashion_mnist": "FashionMNIST/raw"}
_IDX_PUBLISHED = {"train-images-idx3-ubyte": (60000, 28, 28), "train-labels-idx1-ubyte": (60000,),
                  "t10k-images-idx3-ubyte": (10000, 28, 28), "t10k-labels-idx1-ubyte": (10000,)}
# CIFAR-10's python batches: 10,000 images in each.
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_PUBLISHED = {**{f"data_batch_{i}": 10000 for i in range(1, 6)}, "test_batch": 10000}

_seen: dict[Any, Any] = {}  # (what was listed, with its folders' times) -> the answer


def data_content(cfg: DataConfig) -> str | None:
    """A short description of the data's files and a hash of their listing; None where the
    config alone says what the data is."""
    try:
        return _content(cfg)
    except OSError as exc:  # a folder it may not read: the data checks say so in their words
        return f"{cfg.name}: unreadable ({exc.strerror or exc})"


def _content(cfg: DataConfig) -> str | None:
    root = Path(cfg.root)
    if cfg.name == "imagefolder":
        return image_folder_content(root, (cfg.imagefolder.train, cfg.imagefolder.val))
    if cfg.name in _IDX_FOLDERS:
        folder = root / _IDX_FOLDERS[cfg.name]
        shapes = [f"{name.rsplit('-', 2)[0]} {'x'.join(map(str, _idx_shape(folder / name, dims)))}"
                  for name, dims in _IDX_PUBLISHED.items()]
        return f"{cfg.name}: " + ", ".join(shapes)
    if cfg.name == "cifar10":
        folder = root / _CIFAR_FOLDER
        counts = [f"{name} {_cifar_count(folder / name, count)}"
                  for name, count in _CIFAR_PUBLISHED.items()]
        return "cifar10: " + ", ".join(counts)
    return None


def image_folder_content(root: Path, splits: tuple[str, ...]) -> str:
    """'train 20 / val 8 files in 2 classes, 12,345 bytes, sha256 1a2b3c4d5e6f7081': the
    relative path and size of every image file of each split, hashed in sorted order."""
    listing = {split: _class_folders(root / split) for split in splits}
    key = ("imagefolder", str(root.absolute()), tuple(
        (split, tuple((name, _mtime(root / split / name)) for name in names or ()),
         _mtime(root / split)) for split, names in listing.items()))
    if key in _seen:
        return _seen[key]
    digest, counts, total, classes = hashlib.sha256(), [], 0, set()
    for split, names in listing.items():
        if names is None:  # the split's folder is not there (the data checks say so)
            digest.update(f"{split}\tabsent\n".encode())
            counts.append(f"{split} absent")
            continue
        files = 0
        for name in names:
            classes.add(name)
            for entry in sorted(os.scandir(root / split / name), key=lambda e: e.name):
                if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    size = entry.stat().st_size
                    digest.update(f"{split}/{name}/{entry.name}\t{size}\n".encode())
                    files, total = files + 1, total + size
        counts.append(f"{split} {files}")
    answer = (f"{' / '.join(counts)} files in {len(classes)} classes, {total:,} bytes, "
              f"sha256 {digest.hexdigest()[:16]}")
    _seen[key] = answer
    return answer


def _class_folders(folder: Path) -> list[str] | None:
    """The class folders' names, sorted (hidden ones left out, as the dataset does); None when
    `folder` is not a folder."""
    if not folder.is_dir():
        return None
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns if path.exists() else -1


def _idx_shape(path: Path, published: tuple[int, ...]) -> tuple[int, ...]:
    """The sizes an IDX file's header declares; the published ones when the file is missing
    (it is about to be downloaded), () when the header is unreadable (the data checks say
    why)."""
    if not path.is_file():
        return published
    with path.open("rb") as f:
        head = f.read(4 + 4 * len(published))
    if len(head) < 4 + 4 * len(published):
        return ()
    return tuple(int.from_bytes(head[4 + 4 * i:8 + 4 * i], "big") for i in range(len(published)))


def _cifar_count(path: Path, published: int) -> int:
    """The images in one CIFAR-10 batch file (its labels, counted); the published count when
    it is missing, -1 when it does not read (the data checks say why)."""
    if not path.is_file():
        return published
    stat = path.stat()
    key = ("cifar10", str(path.absolute()), stat.st_size, stat.st_mtime_ns)
    if key not in _seen:
        try:
            with path.open("rb") as f:
                batch = pickle.load(f, encoding="latin1")
            _seen[key] = len(batch.get("labels", batch.get("fine_labels", [])))
        except Exception:  # noqa: BLE001 - any failure to read: the data checks name it
            _seen[key] = -1
    return _seen[key]
