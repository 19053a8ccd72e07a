"""Datasets by name. Each opens as a pair (train, test) of either in-memory tensors
(train/data/tensors.py: synthetic, the torchvision datasets) or sample sets read one sample at
a time (train/data/imagefolder.py, train/data/pysource.py); train/data/build.py then puts them
on the memory or the stream path.

`ensure_available(cfg.data)` is what the launcher and the doctor check before any worker
starts: files present (or downloaded), folders laid out right, the factory importable.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.schema import DataConfig
from train.data import official, pysource, val_split
from train.data.synthetic import make_synthetic
from train.data.tensors import TensorData, channel_stats

Opener = Callable[[DataConfig, int, bool], tuple[Any, Any]]


def _synthetic(cfg: DataConfig, seed: int, download: bool) -> tuple[TensorData, TensorData]:
    return make_synthetic(cfg.synthetic, seed)


def _official(cfg: DataConfig, seed: int, download: bool) -> tuple[TensorData, TensorData]:
    return official.load(cfg, download)


def _imagefolder(cfg: DataConfig, seed: int, download: bool) -> tuple[Any, Any]:
    return val_split.scan_folder(cfg, seed)


def _python(cfg: DataConfig, seed: int, download: bool) -> tuple[Any, Any]:
    return pysource.open_python(cfg)


DATASETS: dict[str, Opener] = {
    "synthetic": _synthetic,
    "fashion_mnist": _official,
    "mnist": _official,
    "cifar10": _official,
    "imagefolder": _imagefolder,
    "python": _python,
}


DOWNLOADABLE = ("fashion_mnist", "mnist", "cifar10")  # torchvision fetches them when missing


def open_datasets(cfg: DataConfig, seed: int, download: bool = False,
                  recorded_split: Path | None = None) -> tuple[Any, Any]:
    """(train, test) as the dataset comes: TensorData, or sample sets; `download` lets
    torchvision fetch missing files. `recorded_split`: the run's val_split.json, the
    validation files a run with `data.val_fraction` holds out (used when it exists)."""
    if cfg.name == "imagefolder" and recorded_split is not None:
        return val_split.scan_folder(cfg, seed, recorded_split)
    return DATASETS[cfg.name](cfg, seed, download and cfg.download)


def load_datasets(cfg: DataConfig, seed: int,
                  download: bool = False) -> tuple[TensorData, TensorData]:
    """(train, test) of a tensor dataset on the CPU, as the memory path holds them before any
    recipe.

    With `data.normalize`, batches come out with zero mean and unit variance per channel,
    using the training set's statistics for both splits.
    """
    train, test = open_datasets(cfg, seed, download)
    if not isinstance(train, TensorData):
        raise TypeError(f"{cfg.name} is not a tensor dataset; train/data/build.py builds it")
    if cfg.normalize:
        train.mean, train.std = channel_stats(train.images)
        test = test.with_stats_of(train)
    return train, test


class SmallerThanBatch(UserError):
    """The training set holds fewer samples than one global batch: no step could be made."""


def ensure_available(cfg: DataConfig, global_batch: int | None = None) -> str:
    """Files present, or downloaded now (the launcher, before workers start); else one line.
    With `global_batch`: a training set smaller than one global batch is refused here too
    (the workers would refuse it after starting). Returns what was found, for the launcher's
    and the doctor's row."""
    if DATASETS[cfg.name] is _official:
        samples = official.ensure_files(cfg)
        found = f"{cfg.name}: files present in {official.dataset_folder(cfg)}"
    elif cfg.name == "imagefolder":
        train, val = val_split.scan_folder(cfg, seed=0)  # the counts do not depend on the seed
        samples = len(train)
        held = f" (data.val_fraction={cfg.val_fraction:g} of train/)" if cfg.val_fraction else ""
        found = (f"imagefolder: {len(train):,} train / {len(val):,} val{held} images in "
                 f"{len(train.classes)} classes, in {cfg.root}")
    elif cfg.name == "python":
        train, test = pysource.open_python(cfg)
        samples = len(train)
        found = (f"python: data.factory {cfg.factory} gives {len(train):,} train / "
                 f"{len(test):,} test samples in {len(train.classes)} classes")
    else:
        samples = cfg.synthetic.train_samples
        found = (f"synthetic: generated in memory ({cfg.synthetic.train_samples:,} train / "
                 f"{cfg.synthetic.test_samples:,} test)")
    if global_batch is not None and samples < global_batch:
        raise SmallerThanBatch(f"the training set ({samples} samples) is smaller than one global "
                               f"batch ({global_batch}); lower train.batch_size")
    return found


dataset_folder = official.dataset_folder
torchvision_class = official.torchvision_class

__all__ = ["DATASETS", "DOWNLOADABLE", "SmallerThanBatch", "TensorData", "dataset_folder",
           "ensure_available", "load_datasets", "make_synthetic", "open_datasets",
           "torchvision_class"]
