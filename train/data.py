"""Datasets held as in-memory tensors, sharded across ranks by index.

Small image datasets fit in memory many times over, so every dataset becomes one uint8 tensor
of shape [N, C, H, W] plus int64 labels, kept on the worker's GPU when it fits. A batch is then
one gather by index (`images[idx]`), not N decoded PIL images: waiting for data stays a
negligible part of a step. `DistributedSampler` decides which indices each rank trains on.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler, Sampler

from train.config import Config, DataConfig, SyntheticConfig
from train.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class TensorData:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    num_classes: int
    mean: torch.Tensor | None = None  # per-channel, in 0..255 units, shape [1, C, 1, 1]
    std: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def to(self, device: torch.device) -> TensorData:
        return self.replace(lambda t: t.to(device))

    def replace(self, move) -> TensorData:
        return TensorData(move(self.images), move(self.labels), self.num_classes,
                          *(None if t is None else move(t) for t in (self.mean, self.std)))

    def with_stats_of(self, other: TensorData) -> TensorData:
        """This data normalized with `other`'s statistics (the test set uses the train set's)."""
        return TensorData(self.images, self.labels, self.num_classes, other.mean, other.std)


def channel_stats(images: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images, in 0..255 units, computed in float64 chunks."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].to(torch.float64)
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-6).sqrt()
    return mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)


# --- synthetic -------------------------------------------------------------------------------


def make_synthetic(cfg: SyntheticConfig, seed: int) -> tuple[TensorData, TensorData]:
    """A learnable but not trivial 10-class image task, deterministic from `seed`.

    Each class has a smooth random prototype; a sample blends its class prototype with another
    class's (up to 55%, so some samples are ambiguous), gets its own contrast, brightness and
    a shift of up to 2 pixels, then
    Gaussian noise. Train and test samples are drawn from the same distribution.
    """
    gen = torch.Generator().manual_seed(seed)
    k, c, side = cfg.num_classes, cfg.channels, cfg.image_size
    coarse = torch.rand(k, c, 7, 7, generator=gen)
    prototypes = F.interpolate(coarse, size=(side + 4, side + 4), mode="bilinear",
                               align_corners=False)
    train = _draw(prototypes, cfg.train_samples, side, gen)
    test = _draw(prototypes, cfg.test_samples, side, gen)
    return TensorData(*train, k), TensorData(*test, k)


def _draw(prototypes: torch.Tensor, n: int, side: int, gen: torch.Generator):
    k = prototypes.shape[0]
    labels = torch.randint(k, (n,), generator=gen)
    other = torch.randint(k, (n,), generator=gen)
    mix = 0.55 * torch.rand(n, 1, 1, 1, generator=gen)
    x = (1 - mix) * prototypes[labels] + mix * prototypes[other]
    contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=gen)
    brightness = 0.3 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    x = x * contrast + brightness
    # Crop a side x side window at a random offset in [0, 4]: a shift of up to +-2 pixels.
    dy, dx = torch.randint(5, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(side))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(side))[:, None, None, :]
    x = x.gather(2, rows.expand(n, x.shape[1], side, x.shape[3]))
    x = x.gather(3, cols.expand(n, x.shape[1], side, side))
    x = x + 0.35 * torch.randn(x.shape, generator=gen)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels


# --- torchvision -----------------------------------------------------------------------------


def torchvision_class(name: str):
    """The torchvision dataset class behind `data.name` (for its download URLs too)."""
    return _torchvision_classes()[name]


def _torchvision_classes():
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


_EXPECTED_FILES = {
    "fashion_mnist": ("FashionMNIST/raw", "train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                      "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (IDX files, unzipped)"),
    "mnist": ("MNIST/raw", "train-images-idx3-ubyte, train-labels-idx1-ubyte, "
              "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (IDX files, unzipped)"),
    "cifar10": ("cifar-10-batches-py", "data_batch_1 ... data_batch_5, test_batch and "
                "batches.meta (the python version, cifar-10-python.tar.gz, extracted)"),
}


def dataset_folder(cfg: DataConfig) -> Path:
    return Path(cfg.root) / _EXPECTED_FILES[cfg.name][0]


_READ_ERRORS = (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError)


def _open_torchvision(cfg: DataConfig, train: bool, download: bool):
    """The torchvision dataset, read from `data.root`; downloaded first if missing and allowed."""
    cls = _torchvision_classes()[cfg.name]
    # Not download=True straight away: torchvision then prints a line even when files exist.
    for allow_download in ([False, True] if download else [False]):
        try:
            return cls(cfg.root, train=train, download=allow_download)
        except _READ_ERRORS as exc:
            error = exc
    folder, files = _EXPECTED_FILES[cfg.name]
    why = f"download failed: {_first_line(error)}" if download else _first_line(error)
    raise UserError(f"dataset {cfg.name} cannot be read from {Path(cfg.root) / folder} ({why}); "
                    f"put {files} there") from None


def ensure_available(cfg: Config) -> None:
    """Download what is missing (once, before workers start), or fail with one clear line."""
    if cfg.data.name != "synthetic":
        for train in (True, False):
            _open_torchvision(cfg.data, train, cfg.data.download)


def _load_torchvision(cfg: DataConfig, download: bool) -> tuple[TensorData, TensorData]:
    splits = []
    for train in (True, False):
        ds = _open_torchvision(cfg, train, download)
        images = torch.as_tensor(ds.data)
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
        labels = torch.as_tensor(ds.targets, dtype=torch.long)
        splits.append(TensorData(images.contiguous(), labels, len(ds.classes)))
    return splits[0], splits[1]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__).strip()[:160]


def _load_synthetic(cfg: Config, download: bool) -> tuple[TensorData, TensorData]:
    del download
    return make_synthetic(cfg.data.synthetic, cfg.seed)


def _load_named(cfg: Config, download: bool) -> tuple[TensorData, TensorData]:
    return _load_torchvision(cfg.data, download)


DATASETS: dict[str, Callable[[Config, bool], tuple[TensorData, TensorData]]] = {
    "synthetic": _load_synthetic,
    "fashion_mnist": _load_named,
    "mnist": _load_named,
    "cifar10": _load_named,
}


def load_datasets(cfg: Config, download: bool) -> tuple[TensorData, TensorData]:
    """(train, test) on the CPU; `download` lets torchvision fetch missing files.

    With `data.normalize`, batches come out with zero mean and unit variance per channel,
    using the training set's statistics for both splits.
    """
    train, test = DATASETS[cfg.data.name](cfg, download and cfg.data.download)
    if cfg.data.normalize:
        train.mean, train.std = channel_stats(train.images)
        test = test.with_stats_of(train)
    return train, test


def place(data: TensorData, device: torch.device, on_device: bool) -> TensorData:
    """Move the dataset to the GPU when allowed and it takes under a quarter of free memory."""
    if device.type != "cuda":
        return data
    nbytes = data.images.nbytes + data.labels.nbytes
    free, _ = torch.cuda.mem_get_info(device)
    if on_device and nbytes < free // 4:
        return data.to(device)
    log.info("dataset (%.0f MB) stays in pinned host memory", nbytes / 2**20)
    return data.replace(lambda t: t.pin_memory())


# --- sharding --------------------------------------------------------------------------------


class EvalSampler(Sampler[int]):
    """Rank r takes samples r, r+W, r+2W, ...: every sample exactly once across ranks.

    `DistributedSampler` pads the last shard with repeated samples so that ranks get equal
    counts, which double-counts them in accuracy. Evaluation needs no equal counts: it runs no
    collective per batch, only one all_reduce of the totals at the end.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int):
        self.indices = range(rank, num_samples, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class Batches:
    """This rank's batches from an in-memory dataset, in the order its sampler gives.

    Training drops the last incomplete batch so that every rank runs the same number of steps
    (a rank with one step more would wait forever in its gradient allreduce).
    """

    def __init__(self, data: TensorData, sampler: Sampler[int], batch_size: int,
                 device: torch.device, drop_last: bool, channels_last: bool = False):
        self.data, self.sampler, self.batch_size = data, sampler, batch_size
        self.device, self.drop_last = device, drop_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._order: torch.Tensor | None = None
        if data.mean is not None:
            self.mean, self.std = data.mean.to(device), data.std.to(device)

    def set_epoch(self, epoch: int) -> None:
        # Without this DistributedSampler shuffles every epoch the same way.
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        self._order = None

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in order (computed once)."""
        if self._order is None:
            self._order = torch.as_tensor(list(self.sampler), dtype=torch.long)
        return self._order

    def iterate(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches `start`, `start + 1`, ...: resuming inside an epoch skips by index, no work."""
        order = self.indices().to(self.data.images.device)
        for i in range(start, len(self)):
            yield self.batch(order[i * self.batch_size:(i + 1) * self.batch_size])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate()

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.data.images[idx].to(self.device, non_blocking=True).float()
        labels = self.data.labels[idx].to(self.device, non_blocking=True)
        if self.data.mean is None:
            images = images.div_(255)
        else:
            images = images.sub_(self.mean).div_(self.std)
        return images.contiguous(memory_format=self.memory_format), labels


def train_batches(data: TensorData, rank: int, world_size: int, global_batch: int, seed: int,
                  device: torch.device, channels_last: bool = False) -> Batches:
    """Shuffled shards of equal size per rank; a global step sees exactly `global_batch` samples."""
    sampler = DistributedSampler(range(len(data)), num_replicas=world_size, rank=rank,
                                 shuffle=True, seed=seed, drop_last=True)
    batches = Batches(data, sampler, global_batch // world_size, device, drop_last=True,
                      channels_last=channels_last)
    if len(batches) == 0:
        raise UserError(f"the training set ({len(data)} samples) is smaller than one global batch "
                        f"({global_batch}); lower train.batch_size", agreed=True)  # every rank
    return batches


def eval_batches(data: TensorData, rank: int, world_size: int, batch_size: int,
                 device: torch.device, pad: bool = False, channels_last: bool = False) -> Batches:
    """Every test sample exactly once across ranks. `pad=True` plants the classic bug
    (DistributedSampler's padding counts some samples twice), for the sample ledger's test."""
    if pad:
        sampler: Sampler[int] = DistributedSampler(range(len(data)), num_replicas=world_size,
                                                   rank=rank, shuffle=False)
    else:
        sampler = EvalSampler(len(data), rank, world_size)
    return Batches(data, sampler, batch_size, device, drop_last=False,
                   channels_last=channels_last)
