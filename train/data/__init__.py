"""Datasets by name, held as in-memory tensors (train/data/tensors.py) and sharded across ranks
by index (train/data/batches.py).

`load_datasets(cfg.data, seed)` returns (train, test) on the CPU; the worker then places them
on its device.
"""

from __future__ import annotations

from collections.abc import Callable

from common.schema import DataConfig
from train.data import official
from train.data.synthetic import make_synthetic
from train.data.tensors import TensorData, channel_stats

Loader = Callable[[DataConfig, int, bool], tuple[TensorData, TensorData]]


def _synthetic(cfg: DataConfig, seed: int, download: bool) -> tuple[TensorData, TensorData]:
    return make_synthetic(cfg.synthetic, seed)


def _official(cfg: DataConfig, seed: int, download: bool) -> tuple[TensorData, TensorData]:
    return official.load(cfg, download)


DATASETS: dict[str, Loader] = {
    "synthetic": _synthetic,
    "fashion_mnist": _official,
    "mnist": _official,
    "cifar10": _official,
}


def load_datasets(cfg: DataConfig, seed: int,
                  download: bool = False) -> tuple[TensorData, TensorData]:
    """(train, test) on the CPU; `download` lets torchvision fetch missing files.

    With `data.normalize`, batches come out with zero mean and unit variance per channel,
    using the training set's statistics for both splits.
    """
    train, test = DATASETS[cfg.name](cfg, seed, download and cfg.download)
    if cfg.normalize:
        train.mean, train.std = channel_stats(train.images)
        test = test.with_stats_of(train)
    return train, test


def ensure_available(cfg: DataConfig) -> None:
    """Files present, or downloaded now (the launcher, before workers start); else one line."""
    if DATASETS[cfg.name] is _official:
        official.ensure_files(cfg)


dataset_folder = official.dataset_folder
torchvision_class = official.torchvision_class

__all__ = ["DATASETS", "TensorData", "dataset_folder", "ensure_available", "load_datasets",
           "make_synthetic", "torchvision_class"]
