"""The real torchvision loaders, offline, on small files written here in the official formats."""

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import UserError
from tests.workers import DEFAULT_CONFIG
from train.config import load_config
from train.data import ensure_available, load_datasets


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX (LeCun's MNIST format): magic 0x08 (unsigned byte) + ndim, big-endian sizes, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str, n_train: int = 40, n_test: int = 13) -> dict:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
        arrays[split] = (images, labels)
    return arrays


def write_cifar10(root: Path, per_batch: int = 6, n_test: int = 7) -> dict:
    """The python version: pickled dicts with 'data' (N x 3072, CHW rows) and 'labels'."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = {"train": [], "test": None}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n).tolist(), "batch_label": name}
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f)
        if name == "test_batch":
            written["test"] = batch
        else:
            written["train"].append(batch)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return written


@pytest.mark.parametrize("name, folder", [("fashion_mnist", "FashionMNIST"), ("mnist", "MNIST")])
def test_mnist_family_reads_idx_files(tmp_path, name, folder):
    arrays = write_mnist(tmp_path, folder)
    cfg = load_config(DEFAULT_CONFIG, [f"data.name={name}", f"data.root={tmp_path}",
                                       "data.download=false"])
    ensure_available(cfg.data)
    train, test = load_datasets(cfg.data, cfg.seed, download=False)
    assert train.images.shape == (40, 1, 28, 28) and test.images.shape == (13, 1, 28, 28)
    assert torch.equal(train.images[:, 0], torch.from_numpy(arrays["train"][0]))
    assert torch.equal(test.labels, torch.from_numpy(arrays["t10k"][1]).long())
    assert train.num_classes == 10


def test_cifar10_reads_python_batches(tmp_path):
    written = write_cifar10(tmp_path)
    cfg = load_config(DEFAULT_CONFIG, ["data.name=cifar10", f"data.root={tmp_path}"])
    # present: no download is attempted
    train, test = load_datasets(cfg.data, cfg.seed, download=True)
    assert train.images.shape == (30, 3, 32, 32) and test.images.shape == (7, 3, 32, 32)
    first = torch.from_numpy(written["train"][0]["data"][0]).view(3, 32, 32)
    assert torch.equal(train.images[0], first)
    assert test.labels.tolist() == written["test"]["labels"]
    assert train.mean.shape == (1, 3, 1, 1)


@pytest.mark.parametrize("name, folder, files", [
    ("fashion_mnist", "FashionMNIST/raw", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
    ("cifar10", "cifar-10-batches-py", ["data_batch_5", "test_batch", "batches.meta"])])
def test_missing_dataset_offline_is_one_clear_error(tmp_path, name, folder, files):
    cfg = load_config(DEFAULT_CONFIG, [f"data.name={name}", f"data.root={tmp_path}",
                                       "data.download=false"])
    with pytest.raises(UserError) as info:
        ensure_available(cfg.data)
    message = str(info.value)
    assert str(tmp_path / folder) in message and "put " in message
    assert all(f in message for f in files)  # every file the loader reads is named
    assert "\n" not in message
    # in this project's terms, not torchvision's ("You can use download=True")
    assert "data.download=true" in message and "download=True" not in message


def test_truncated_idx_file_is_reported(tmp_path):
    write_mnist(tmp_path, "MNIST")
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:100])
    cfg = load_config(DEFAULT_CONFIG, ["data.name=mnist", f"data.root={tmp_path}",
                                       "data.download=false"])
    with pytest.raises(UserError, match=f"{images} is truncated: 100 bytes"):
        load_datasets(cfg.data, cfg.seed, download=False)
