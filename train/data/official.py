"""The book's datasets as torchvision reads them (Fashion-MNIST, MNIST, CIFAR-10), turned into
uint8 tensors; files present are read as they are, missing ones downloaded when allowed."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from common.errors import UserError
from common.schema import DataConfig
from train.data.tensors import TensorData

_IDX = ("train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte (IDX files, unzipped)")
_EXPECTED_FILES = {  # data.name -> (folder under data.root, the files it must hold)
    "fashion_mnist": ("FashionMNIST/raw", _IDX),
    "mnist": ("MNIST/raw", _IDX),
    "cifar10": ("cifar-10-batches-py", "data_batch_1 ... data_batch_5, test_batch and "
                "batches.meta (the python version, cifar-10-python.tar.gz, extracted)"),
}
# What torchvision raises on files it cannot read (an IDX header it does not expect is an
# AssertionError; our own checks below name the file first).
_READ_ERRORS = (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError,
                AssertionError, KeyError, TypeError)
_IDX_FILES = {"train-images-idx3-ubyte": 3, "train-labels-idx1-ubyte": 1,
              "t10k-images-idx3-ubyte": 3, "t10k-labels-idx1-ubyte": 1}  # name -> dimensions


def torchvision_class(name: str) -> Any:
    """The torchvision dataset class behind `data.name` (for its download URLs too)."""
    return _torchvision_classes()[name]


def _torchvision_classes() -> dict[str, Any]:
    import torchvision.datasets as tvd

    class CIFAR10(tvd.CIFAR10):
        # torchvision checks every batch file's md5 before reading; the md5 protects downloads,
        # and files already present (copied from elsewhere, or written by our tests) are read
        # as they are. Downloads still verify the archive's md5.
        def _check_integrity(self) -> bool:
            folder = Path(self.root) / self.base_folder
            return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            path = Path(self.root) / self.base_folder / self.meta["filename"]
            if not path.is_file():
                raise RuntimeError(f"{path} not found")
            with path.open("rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    return {"fashion_mnist": tvd.FashionMNIST, "mnist": tvd.MNIST, "cifar10": CIFAR10}


def dataset_folder(cfg: DataConfig) -> Path:
    """Where dataset `cfg.name`'s files live under `data.root`."""
    return Path(cfg.root) / _EXPECTED_FILES[cfg.name][0]


def ensure_files(cfg: DataConfig) -> int:
    """Download what is missing (once, before workers start), or fail with one clear line;
    files that are there but truncated or not in their format are named. Returns the number
    of training samples."""
    sizes = [len(_open(cfg, train, cfg.download)) for train in (True, False)]
    return sizes[0]


def check_formats(cfg: DataConfig) -> None:
    """Each file present in the format torchvision reads, or a UserError naming it."""
    folder = dataset_folder(cfg)
    if cfg.name == "cifar10":
        for path in sorted(folder.glob("*_batch*")):
            _check_cifar_batch(path)
        meta = folder / "batches.meta"
        if meta.is_file():
            try:
                with meta.open("rb") as f:
                    names = pickle.load(f, encoding="latin1")["label_names"]
            except Exception as exc:  # noqa: BLE001
                raise UserError(f"{meta} cannot be read as CIFAR-10's class names "
                                f"({_first_line(exc)}); download it again") from None
            if not names:
                raise UserError(f"{meta} lists no class names")
        return
    counts = {}
    for name, ndim in _IDX_FILES.items():
        if (folder / name).is_file():
            counts[name] = _check_idx(folder / name, ndim)
    for split in ("train", "t10k"):
        images, labels = counts.get(f"{split}-images-idx3-ubyte"), \
            counts.get(f"{split}-labels-idx1-ubyte")
        if images is not None and labels is not None and images != labels:
            raise UserError(f"{folder / (split + '-labels-idx1-ubyte')} has {labels} labels but "
                            f"{split}-images-idx3-ubyte has {images} images")


def _check_idx(path: Path, ndim: int) -> int:
    """An IDX file of unsigned bytes: magic 0, 0, 0x08, `ndim`; big-endian sizes; then the
    data, exactly. Returns the first size (the number of items)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(4 + 4 * ndim)
    if len(head) < 4 or head[:3] != b"\x00\x00\x08" or head[3] != ndim:
        raise UserError(f"{path} is not an IDX file of {ndim}-dimensional unsigned bytes (its "
                        f"header starts {head[:4].hex() or 'empty'}, expected 000008{ndim:02x}); "
                        f"download it again (and unzip it)")
    if len(head) < 4 + 4 * ndim:
        raise UserError(f"{path} is truncated: its header is cut off")
    dims = [int.from_bytes(head[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + int(torch.tensor(dims).prod())
    if size != expected:
        raise UserError(f"{path} is {'truncated' if size < expected else 'too long'}: "
                        f"{size:,} bytes for {' x '.join(map(str, dims))} values "
                        f"({expected:,} expected); download it again")
    return dims[0]


def _check_cifar_batch(path: Path) -> None:
    try:
        with path.open("rb") as f:
            batch = pickle.load(f, encoding="latin1")
        data, labels = batch["data"], batch.get("labels", batch.get("fine_labels"))
        ok = getattr(data, "ndim", 0) == 2 and data.shape[1] == 3072 and \
            len(labels) == data.shape[0]
    except Exception as exc:  # noqa: BLE001 - any failure to read means "not the format"
        raise UserError(f"{path} cannot be read as a CIFAR-10 batch ({_first_line(exc)}); "
                        f"download it again") from None
    if not ok:
        raise UserError(f"{path} is not a CIFAR-10 batch (expected 'data' of N x 3072 bytes "
                        f"and N 'labels')")


def load(cfg: DataConfig, download: bool) -> tuple[TensorData, TensorData]:
    """(train, test) as uint8 tensors [N, C, H, W]."""
    splits = []
    for train in (True, False):
        ds = _open(cfg, train, download)
        images = torch.as_tensor(ds.data)
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
        labels = torch.as_tensor(ds.targets, dtype=torch.long)
        splits.append(TensorData(images.contiguous(), labels, len(ds.classes),
                                 classes=[str(c) for c in ds.classes]))
    return splits[0], splits[1]


def _open(cfg: DataConfig, train: bool, download: bool) -> Any:
    """The torchvision dataset, read from `data.root`; downloaded first if missing and allowed."""
    cls = torchvision_class(cfg.name)
    # Not download=True straight away: torchvision then prints a line even when files exist.
    for allow_download in ([False, True] if download else [False]):
        try:
            check_formats(cfg)
            return cls(cfg.root, train=train, download=allow_download)
        except _READ_ERRORS as exc:
            error = exc
    folder, files = _EXPECTED_FILES[cfg.name]
    why = f"download failed: {_first_line(error)}" if download else _first_line(error)
    if "download=True" in why:  # torchvision's advice, in its API's terms: say it in ours
        why = "files missing or incomplete; data.download=true fetches them"
    raise UserError(f"dataset {cfg.name} cannot be read from {Path(cfg.root) / folder} ({why}); "
                    f"put {files} there") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__).strip()[:160]
