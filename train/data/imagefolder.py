"""`data.name=imagefolder`: torchvision's ImageFolder layout, read and checked here.

    data.root/train/<class>/*.jpg|png ...    data.root/val/<class>/...

Classes are the sub-folder names in sorted order (class i is the i-th name, as torchvision
numbers them); train and val must hold the same classes, and every class at least one image.
The folder is scanned once per process (names only, no image opened), so a check costs a
directory listing, also in the launcher before any worker starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import UserError
from common.schema import DataConfig
from train.data import jpeg
from train.data.decode import DECODE_ERRORS, render_path
from train.run.data_identity import IMAGE_EXTENSIONS

EXTENSIONS = IMAGE_EXTENSIONS  # the files read are the files a run's identity lists


class BadSample(Exception):
    """A sample that cannot be read: `where` names it (a file's path), `why` says what failed."""

    def __init__(self, where: str, why: str):
        super().__init__(f"{where}: {why}")
        self.where, self.why = where, why


class PathList:
    """File paths packed into one byte array: loader processes forked from a worker read them
    without touching a Python object per path (reference counts would copy every page of a
    list of a million strings into each loader process)."""

    def __init__(self, paths: list[str]):
        encoded = [p.encode() for p in paths]
        self.offsets = np.cumsum([0] + [len(b) for b in encoded], dtype=np.int64)
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode()


@dataclass
class FileSet:
    """One split of an image folder: file paths and their class indices."""

    folder: Path
    paths: PathList
    labels: torch.Tensor  # int64 [N]
    classes: list[str]
    channels: int = 3  # every image is converted to RGB, as torchvision's loader does
    subset: str = ""  # a part of the folder (data.val_fraction): a digest of its files
    decoder: str = "pil"  # data.decoder as run (auto resolved): simplejpeg or pil

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return self.paths[index]

    def load(self, index: int, view_of: Any) -> tuple[torch.Tensor, int]:
        """The image rendered for `view_of(width, height)` and its label; BadSample if the
        file cannot be decoded."""
        path = self.paths[index]
        try:
            return render_path(path, view_of, self.decoder), int(self.labels[index])
        except DECODE_ERRORS as exc:
            raise BadSample(path, _reason(exc)) from None

    def fingerprint(self) -> list[Any]:
        """What the decoded cache's name depends on: the files and their class folders' times
        (adding, removing or renaming a file changes its folder's modification time)."""
        times = [os.stat(self.folder / c).st_mtime_ns for c in self.classes]
        # The decoder as run: data.decoder=auto renders with PIL until simplejpeg is installed.
        return [str(self.folder), self.classes, times, len(self.paths), self.decoder] + (
            [self.subset] if self.subset else [])


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def scan_split(folder: Path, split_key: str) -> FileSet:
    """The classes and image files of one split; UserError for what would not train."""
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise UserError(f"image folder {folder} {what} (data.root/{split_key}); expected class "
                        f"sub-folders of images there")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and
                     not e.name.startswith("."))
    if not classes:
        raise UserError(f"image folder {folder} has no class folders; put each class's images "
                        f"in a sub-folder named after it ({folder}/<class>/*.jpg)")
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(e.path for e in os.scandir(folder / name)
                       if e.is_file() and e.name.lower().endswith(EXTENSIONS))
        if not found:
            raise UserError(f"class folder {folder / name} holds no images "
                            f"({', '.join(EXTENSIONS)}); remove it or add images")
        paths += found
        labels += [label] * len(found)
    return FileSet(folder, PathList(paths), torch.tensor(labels, dtype=torch.long), classes)


def scan(cfg: DataConfig) -> tuple[FileSet, FileSet]:
    """(train, val) of `data.root`, checked to hold the same classes."""
    root = Path(cfg.root)
    if cfg.decoder == "simplejpeg" and not jpeg.available():
        raise UserError("data.decoder=simplejpeg, but simplejpeg is not installed (pip install "
                        "simplejpeg, as requirements.txt pins it); data.decoder=auto uses PIL "
                        "without it")
    if not root.is_dir():
        raise UserError(f"data.root {root} is not a folder; data.name=imagefolder reads "
                        f"{root}/{cfg.imagefolder.train}/<class>/*.jpg and "
                        f"{root}/{cfg.imagefolder.val}/<class>/*.jpg")
    train = scan_split(root / cfg.imagefolder.train, "data.imagefolder.train")
    val = scan_split(root / cfg.imagefolder.val, "data.imagefolder.val")
    train.decoder = val.decoder = jpeg.resolve(cfg.decoder)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise UserError(f"{train.folder} and {val.folder} hold different classes (only in "
                        f"train: {_few(only_train)}; only in val: {_few(only_val)}); both need "
                        f"the same class folders")
    if len(train.classes) == 1:
        raise UserError(f"image folder {train.folder} has one class folder "
                        f"({train.classes[0]}): a classifier of one class is always right and "
                        f"learns nothing; put each class's images in a sub-folder of its own")
    return train, val


def _few(names: list[str], limit: int = 4) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
