"""This rank's batches from an in-memory dataset, sharded by index: `DistributedSampler` decides
which indices each rank trains on; evaluation counts every sample exactly once."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DistributedSampler, Sampler

from common.errors import UserError
from train.data.prefetch import CopyAhead
from train.data.tensors import TensorData

# (images [B, C, H, W] float on the device, their sample indices, epoch) -> training images
Augment = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


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


class ShardOrder:
    """A rank's sample order and batch count for an epoch, from its sampler (both paths)."""

    sampler: Sampler[int]
    batch_size: int
    drop_last: bool
    _order: torch.Tensor | None = None

    def new_epoch(self, epoch: int) -> None:
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

    def seen(self, batches: int) -> list[int]:
        """The sample indices of this epoch's first `batches` batches, in order."""
        return self.indices()[:self.batch_size * batches].tolist()

    def close(self) -> None:
        """Let go of loader processes (the stream path); nothing on the memory path."""

    def empty_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of zero samples shaped as this split's batches (mode fsdp's padding
        forwards on a rank without any evaluation batch)."""
        raise NotImplementedError


class Batches(ShardOrder):
    """This rank's batches from an in-memory dataset, in the order its sampler gives.

    Training drops the last incomplete batch so that every rank runs the same number of steps
    (a rank with one step more would wait forever in its gradient allreduce). A dataset that
    is not on the training device goes through `CopyAhead` (pinned staging, the next batch's
    copy in flight); `copy_ahead` forces that choice (tests run it on the CPU).
    """

    def __init__(self, data: TensorData, sampler: Sampler[int], batch_size: int,
                 device: torch.device, drop_last: bool, channels_last: bool = False,
                 augment: Augment | None = None, copy_ahead: bool | None = None):
        self.data, self.sampler, self.batch_size = data, sampler, batch_size
        self.device, self.drop_last = device, drop_last
        self.augment, self.epoch = augment, 0  # the recipe's batched ops (train/data/augment.py)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._order: torch.Tensor | None = None
        if copy_ahead is None:
            copy_ahead = data.images.device != device
        self.copy_ahead = CopyAhead(device, self.prepare) if copy_ahead else None
        if data.mean is not None:
            self.mean, self.std = data.mean.to(device), data.std.to(device)

    def set_epoch(self, epoch: int) -> None:
        self.new_epoch(epoch)
        self.epoch = epoch

    def iterate(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches `start`, `start + 1`, ...: resuming inside an epoch skips by index, no work."""
        order = self.indices().to(self.data.images.device)
        slices = (order[i * self.batch_size:(i + 1) * self.batch_size]
                  for i in range(start, len(self)))
        if self.copy_ahead is not None:
            yield from self.copy_ahead.batches(self.data.images, self.data.labels, slices)
            return
        for idx in slices:
            yield self.batch(idx)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate()

    def empty_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch(torch.empty(0, dtype=torch.long, device=self.data.images.device))

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples `idx` of a dataset that lives on the training device."""
        return self.prepare(self.data.images[idx].to(self.device, non_blocking=True),
                            self.data.labels[idx].to(self.device, non_blocking=True),
                            idx.to(self.device, non_blocking=True))

    def prepare(self, images: torch.Tensor, labels: torch.Tensor,
                idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images on the device -> float, augmented (each sample keyed by (seed, epoch,
        index)), normalized, in the model's memory format."""
        images = images.float()
        if self.augment is not None:
            images = self.augment(images, idx, self.epoch)
        if self.data.mean is None:
            images = images.div_(255)
        else:
            images = images.sub_(self.mean).div_(self.std)
        return images.contiguous(memory_format=self.memory_format), labels


def train_batches(data: TensorData, rank: int, world_size: int, global_batch: int, seed: int,
                  device: torch.device, channels_last: bool = False,
                  augment: Augment | None = None,
                  copy_ahead: bool | None = None) -> Batches:
    """Shuffled shards of equal size per rank; a global step sees exactly `global_batch` samples."""
    sampler = DistributedSampler(range(len(data)), num_replicas=world_size, rank=rank,
                                 shuffle=True, seed=seed, drop_last=True)
    batches = Batches(data, sampler, global_batch // world_size, device, drop_last=True,
                      channels_last=channels_last, augment=augment, copy_ahead=copy_ahead)
    if len(batches) == 0:
        raise UserError(f"the training set ({len(data)} samples) is smaller than one global batch "
                        f"({global_batch}); lower train.batch_size", agreed=True)  # every rank
    return batches


def eval_batches(data: TensorData, rank: int, world_size: int, batch_size: int,
                 device: torch.device, pad: bool = False, channels_last: bool = False,
                 copy_ahead: bool | None = None) -> Batches:
    """Every test sample exactly once across ranks. `pad=True` plants the classic bug
    (DistributedSampler's padding counts some samples twice), for the sample ledger's test."""
    if pad:
        sampler: Sampler[int] = DistributedSampler(range(len(data)), num_replicas=world_size,
                                                   rank=rank, shuffle=False)
    else:
        sampler = EvalSampler(len(data), rank, world_size)
    return Batches(data, sampler, batch_size, device, drop_last=False,
                   channels_last=channels_last, copy_ahead=copy_ahead)


def split_batch(images: torch.Tensor, labels: torch.Tensor,
                parts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The book's split_batch: `parts` micro-batches (views) along dim 0, their sizes in
    samples differing by at most one; here for gradient accumulation inside one worker."""
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if not 1 <= parts <= images.shape[0]:
        raise ValueError(f"cannot split a batch of {images.shape[0]} samples into {parts} parts")
    return list(zip(images.tensor_split(parts), labels.tensor_split(parts), strict=True))
