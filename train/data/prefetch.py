"""Batches of a dataset held in host memory, on their way to the GPU: gathered into reused
pinned buffers and copied on a side stream, one batch ahead of the one that trains.

Why not `images[idx].to(device, non_blocking=True)`: indexing returns a fresh tensor in
pageable memory (also when `images` is pinned), and a copy from pageable memory is synchronous,
so every step would wait for its own batch and pinning the dataset would buy nothing. Here the
gather writes into one of two pinned staging buffers, the copy runs on its own CUDA stream while
the previous step computes, and the step waits for its batch's copy only (an event), on the GPU.
The sample indices travel the same way (a pinned staging buffer, the side stream): the device's
augmentation keys each sample's crop on them, and a pageable copy would make the host wait for
the image copy queued before it, every step.

On the CPU the same code runs without streams (the CPU twin of the GPU path); training uses it
only when the dataset is not on the training device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

# (images, labels, their sample indices) on the device -> the batch the step trains on
Prepare = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Slot:
    """One staging buffer set, and the event its last copy to the GPU recorded."""

    images: torch.Tensor
    labels: torch.Tensor
    idx: torch.Tensor  # the sample indices (int64), staged like the images
    copied: torch.cuda.Event | None = None


@dataclass
class _InFlight:
    images: torch.Tensor  # on the device, being written by the side stream
    labels: torch.Tensor
    copied: torch.cuda.Event | None  # recorded after the copies (None on the CPU)
    idx: torch.Tensor  # the batch's sample indices (augmentation keys on them)


class CopyAhead:
    """Turns index batches into device batches, the next one's copy in flight while the
    current one trains. `prepare` finishes a batch on the device (float, normalize, layout)."""

    def __init__(self, device: torch.device, prepare: Prepare):
        self.device, self.prepare = device, prepare
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.slots: list[_Slot | None] = [None, None]  # double buffering

    def batches(self, images: torch.Tensor, labels: torch.Tensor,
                slices: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`images[idx], labels[idx]` for each `idx` of `slices`, prepared on the device."""
        indices = iter(slices)
        first = next(indices, None)
        pending = None if first is None else self._start(images, labels, first, 0)
        slot = 1
        while pending is not None:
            batch = self._finish(pending)  # queued on the GPU before the next gather
            idx = next(indices, None)
            pending = None if idx is None else self._start(images, labels, idx, slot)
            slot ^= 1
            yield batch

    def _start(self, images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor,
               slot: int) -> _InFlight:
        """Gather batch `idx` into staging slot `slot`, and start its copy to the device."""
        staging = self._slot(slot, images, labels, idx.numel())
        if staging.copied is not None:
            staging.copied.synchronize()  # this slot's previous batch has left (long ago)
        n = idx.numel()
        x = torch.index_select(images, 0, idx, out=staging.images[:n])
        y = torch.index_select(labels, 0, idx, out=staging.labels[:n])
        i = staging.idx[:n].copy_(idx)
        if not self.cuda:
            # The CPU twin: a copy out of the staging buffers, as the GPU's, which the next use
            # of this slot may then overwrite.
            return _InFlight(x.clone(), y.clone(), None, i.clone())
        with torch.cuda.stream(self.stream):
            on_device = _InFlight(x.to(self.device, non_blocking=True),
                                  y.to(self.device, non_blocking=True), torch.cuda.Event(),
                                  i.to(self.device, non_blocking=True))
            on_device.copied.record(self.stream)
        staging.copied = on_device.copied
        return on_device

    def _finish(self, batch: _InFlight) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's stream waits for this batch's copy (not for the next one's)."""
        if batch.copied is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(batch.copied)
            # Allocated on the side stream, used on this one: the caching allocator must not
            # hand the memory out again before this stream is done with it.
            # The indices too: the augmentation reads them on this stream, and a block freed
            # while it is still queued would silently change the crops (and bitwise resume).
            for tensor in (batch.images, batch.labels, batch.idx):
                tensor.record_stream(current)
        return self.prepare(batch.images, batch.labels, batch.idx)

    def _slot(self, slot: int, images: torch.Tensor, labels: torch.Tensor,
              rows: int) -> _Slot:
        """Staging slot `slot`, (re)allocated when a batch of `rows` samples does not fit."""
        current = self.slots[slot]
        if current is None or current.images.shape[0] < rows:
            if current is not None and current.copied is not None:
                current.copied.synchronize()
            current = _Slot(torch.empty((rows, *images.shape[1:]), dtype=images.dtype,
                                        pin_memory=self.cuda),
                            torch.empty(rows, dtype=labels.dtype, pin_memory=self.cuda),
                            torch.empty(rows, dtype=torch.long, pin_memory=self.cuda))
            self.slots[slot] = current
        return current
