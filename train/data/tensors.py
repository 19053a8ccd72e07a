"""Datasets held as in-memory tensors: one uint8 tensor [N, C, H, W] plus int64 labels.

Small image datasets fit in memory many times over; a batch is then one gather by index
(`images[idx]`), not N decoded images, and waiting for data stays a negligible part of a step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class TensorData:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    num_classes: int
    mean: torch.Tensor | None = None  # per-channel, in 0..255 units, shape [1, C, 1, 1]
    std: torch.Tensor | None = None
    classes: list[str] | None = None  # the class names, when the dataset has them

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

    def replace(self, move: Callable[[torch.Tensor], torch.Tensor]) -> TensorData:
        """The same data with every tensor passed through `move` (to a device, pinned)."""
        return TensorData(move(self.images), move(self.labels), self.num_classes,
                          *(None if t is None else move(t) for t in (self.mean, self.std)),
                          self.classes)

    def with_stats_of(self, other: TensorData) -> TensorData:
        """This data normalized with `other`'s statistics (the test set uses the train set's)."""
        return TensorData(self.images, self.labels, self.num_classes, other.mean, other.std,
                          self.classes)


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


def place(data: TensorData, device: torch.device, on_device: bool) -> TensorData:
    """Move the dataset to the GPU when allowed and it takes under a quarter of free memory.

    Otherwise it stays in host memory as it is: batches are gathered into small pinned buffers
    (train/data/prefetch.py); pinning the whole dataset would lock that much RAM for nothing,
    since a gather from it lands in pageable memory anyway."""
    if device.type != "cuda":
        return data
    nbytes = data.images.nbytes + data.labels.nbytes
    free, _ = torch.cuda.mem_get_info(device)
    if on_device and nbytes < free // 4:
        return data.to(device)
    log.info("dataset (%.0f MB) stays in host memory; batches are copied ahead through pinned "
             "buffers", nbytes / 2**20)
    return data
