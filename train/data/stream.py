"""The stream path: a `DataLoader` per worker over the rank's `DistributedSampler` shard, with
the same interface as the in-memory batches (train/data/batches.py), so the loop does not
know which path it runs.

Loader processes decode and render samples (train/data/decode.py) and hand back uint8
tensors; normalization, the device's part of the recipe and the memory format happen on the
device, batched. Each sample's augmentation is keyed by (seed, epoch, index), never by the
loader process or the order of work, so neither `data.num_workers` nor a restart inside an
epoch changes a batch. Batch k of an epoch is exactly the samples k*B ... (k+1)*B-1 of the
rank's order: resuming at batch k starts the loader there.
"""

from __future__ import annotations

import atexit
import logging
import random
import signal
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from common.errors import UserError
from train.data.augment import Augment
from train.data.batches import ShardOrder
from train.data.cache import DecodedFile
from train.data.counters import DataClock, DataCounters, Problem
from train.data.decode import render_tensor
from train.data.imagefolder import BadSample
from train.data.loader_server import loader_context, start_loader
from train.data.tensors import TensorData

log = logging.getLogger(__name__)
GATHER_MAX_UNTRUSTED = 0.02  # above this share of slots to decode, an epoch uses the loader

Raw = tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, list[Problem]]
Item = tuple[int, torch.Tensor | None, int, str, bool]


@dataclass
class TensorSet:
    """An in-memory dataset read sample by sample (data.loader=stream on a tensor dataset)."""

    data: TensorData
    classes: list[str]

    @property
    def channels(self) -> int:
        return self.data.channels

    def __len__(self) -> int:
        return len(self.data)

    def describe(self, index: int) -> str:
        return f"sample {index}"

    def load(self, index: int, view_of: Any) -> tuple[torch.Tensor, int]:
        image = self.data.images[index]
        return render_tensor(image, view_of(image.shape[-1], image.shape[-2])), \
            int(self.data.labels[index])


class SampleReader(Dataset):
    """What a loader process computes for (epoch, index): the rendered sample.

    `split`: "train" (the recipe's per-sample view and shift), "eval" (its evaluation view) or
    "stored" (the stored square the device draws the recipe from: memory path, cache).
    """

    def __init__(self, samples: Any, augment: Augment, split: str,
                 cache: DecodedFile | None = None):
        self.samples, self.augment, self.split, self.cache = samples, augment, split, cache

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> Item:
        """(index, uint8 image or None, label, what went wrong, whether it must stop the run).

        Problems travel back as data, not exceptions: an exception in a loader process would
        reach the worker as a traceback of that process."""
        epoch, index = key
        if self.cache is not None:
            state = self.cache.state(index, epoch)
            if state > 0:
                return (index, *self.cache.read(index), "", False)
            if state < 0:
                return (index, None, -1, f"{self.samples.describe(index)} (unreadable, as the "
                        f"decoded cache remembers)", False)
        try:
            image, label = self.render(epoch, index)
        except BadSample as exc:
            if self.cache is not None:
                self.cache.write(index, None, -1, epoch)
            return index, None, -1, f"{exc.where} ({exc.why})", False
        except UserError as exc:  # a malformed sample of the user's dataset
            return index, None, -1, str(exc), True
        if self.cache is not None:
            self.cache.write(index, image, label, epoch)
        return index, image, label, "", False

    def render(self, epoch: int, index: int) -> tuple[torch.Tensor, int]:
        aug = self.augment
        if self.split == "train":
            image, label = self.samples.load(
                index, lambda w, h: aug.train_view(w, h, epoch, index))
            return aug.sample_shift(image, epoch, index), label
        view_of = aug.eval_view if self.split == "eval" else aug.stored_view
        return self.samples.load(index, view_of)


def collate(items: list[Item]) -> Raw:
    """uint8 images [B, C, H, W], labels, sample indices, and the problems of bad samples."""
    good = [it for it in items if it[1] is not None]
    bad = [(it[0], it[3], it[4]) for it in items if it[1] is None]
    images = torch.stack([it[1] for it in good]) if good else None
    labels = torch.tensor([it[2] for it in good], dtype=torch.long)
    indices = torch.tensor([it[0] for it in good], dtype=torch.long)
    return images, labels, indices, bad


class _Plan:
    """The batch sampler a persistent DataLoader re-reads each time it is iterated."""

    def __init__(self) -> None:
        self.epoch, self.batches = 0, []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return ([(self.epoch, i) for i in b.tolist()] for b in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _quiet_loader_process(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: a loader process that died of it would take the
    # batches the worker still needs to reach the step where it checkpoints and stops. (So
    # SIGTERM cannot end them either: StreamBatches.close does, and at the latest _close_all.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32  # torch seeds each loader process; numpy and random too
    np.random.seed(seed)
    random.seed(seed)


@dataclass(frozen=True)
class LoaderOptions:
    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    prefetch_factor: int
    seed: int


class StreamBatches(ShardOrder):
    """This rank's batches from a DataLoader, in the order its sampler gives."""

    def __init__(self, reader: SampleReader, sampler: Sampler[int], batch_size: int,
                 drop_last: bool, device: torch.device, options: LoaderOptions,
                 finish: Callable[[Raw, int], tuple[torch.Tensor, torch.Tensor]],
                 clock: DataClock, counters: DataCounters,
                 collate_fn: Callable[[list[Item]], Raw] = collate):
        self.reader, self.sampler, self.batch_size = reader, sampler, batch_size
        self.data = reader.samples  # len() is the split's size, as the memory path's `data`
        self.drop_last, self.device, self.finish = drop_last, device, finish
        self.clock, self.counters = clock, counters
        self._order: torch.Tensor | None = None
        self._plan = _Plan()
        workers = options.num_workers
        self.loader = DataLoader(
            reader, batch_sampler=self._plan, num_workers=workers, collate_fn=collate_fn,
            pin_memory=options.pin_memory, worker_init_fn=_quiet_loader_process,
            persistent_workers=options.persistent_workers and workers > 0,
            multiprocessing_context=loader_context() if workers else None,
            prefetch_factor=options.prefetch_factor if workers else None,
            generator=torch.Generator().manual_seed(options.seed))
        _open.add(self)

    def close(self) -> None:
        """End the persistent loader processes. They ignore SIGTERM, and at the interpreter's
        exit multiprocessing would wait for them forever after sending them just that."""
        live = self.loader._iterator  # DataLoader keeps it when persistent_workers is set
        self.loader._iterator = None
        if live is not None and hasattr(live, "_shutdown_workers"):
            live._shutdown_workers()
        _open.discard(self)

    def set_epoch(self, epoch: int) -> None:
        self.new_epoch(epoch)
        self.clock.set_epoch(epoch)

    def empty_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's first sample rendered here, as the loader would, then cut to zero
        samples: the shape the split's batches have (no `data.images` to read it from)."""
        epoch = self.clock.epoch
        images, labels = self.finish(self.loader.collate_fn([self.reader[(epoch, 0)]]), epoch)
        return images[:0], labels[:0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate()

    def iterate(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches `start`, `start + 1`, ...: a resume inside an epoch starts the loader there."""
        order, size, epoch = self.indices(), self.batch_size, self.clock.epoch
        batches = [order[i * size:(i + 1) * size] for i in range(start, len(self))]
        cache = self.reader.cache
        if cache is not None and batches and cache.untrusted(
                order[start * size:], epoch) <= GATHER_MAX_UNTRUSTED * len(order[start * size:]):
            raws: Iterator[Raw] = (self._gather(b, epoch) for b in batches)
        else:
            self._plan.epoch, self._plan.batches = epoch, batches
            raws = start_loader(self.loader)
        for raw in ahead(raws, self.device):
            yield self.finish(raw, epoch)

    def _gather(self, indices: torch.Tensor, epoch: int) -> Raw:
        """A batch read from the decoded cache in this process (the few slots not filled yet
        are decoded here)."""
        cache = self.reader.cache
        if cache.untrusted(indices, epoch) == 0:
            images, labels = cache.gather(indices)
            return images, labels, indices, []
        return collate([self.reader[(epoch, int(i))] for i in indices])


_open: weakref.WeakSet[StreamBatches] = weakref.WeakSet()


@atexit.register  # after multiprocessing's own exit function, which it therefore runs before
def _close_all() -> None:
    for batches in list(_open):
        batches.close()


def ahead(raws: Iterator[Raw], device: torch.device) -> Iterator[Raw]:
    """Batches on `device`, each copied while the one before is in use (a side stream on
    GPUs; on the CPU there is nothing to copy)."""
    if device.type != "cuda":
        yield from raws
        return
    stream = torch.cuda.Stream(device)

    def start(raw: Raw) -> tuple[Raw, torch.cuda.Event | None]:
        images, labels, indices, bad = raw
        if not isinstance(images, torch.Tensor):
            # nvjpeg's byte lists: the whole batch stays on the host. Its decoder draws the
            # views from the indices there (a device copy read back would wait for the step
            # before) and drops refused files from the labels before they travel.
            return raw, None
        with torch.cuda.stream(stream):
            moved = (images.to(device, non_blocking=True), labels.to(device, non_blocking=True),
                     indices.to(device, non_blocking=True), bad)
            done = torch.cuda.Event()
            done.record(stream)
        return moved, done

    pending = None
    for raw in raws:
        nxt = start(raw)
        if pending is not None:
            yield _ready(*pending)
        pending = nxt
    if pending is not None:
        yield _ready(*pending)


def _ready(raw: Raw, done: Any) -> Raw:
    if done is None:  # nothing was copied
        return raw
    current = torch.cuda.current_stream()
    current.wait_event(done)
    for t in raw[:3]:
        if isinstance(t, torch.Tensor):
            t.record_stream(current)  # the side stream's memory is now the compute stream's
    return raw
