"""The data side of a worker, assembled: the sources by name, the path (memory or stream), the
recipe, and both splits' batches behind one interface (set_epoch, len, indices, seen,
iterate), so the loop has no branch per path.

    memory: one uint8 tensor per split (on the GPU when it fits), batches gathered by index,
            the recipe as batched tensor ops on the device
    stream: a DataLoader per worker (train/data/stream.py), optionally over the decoded cache
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DistributedSampler, Sampler

from common.errors import UserError
from common.host import usable_cores
from common.schema import DataConfig
from train.data import materialize, open_datasets
from train.data.augment import Augment
from train.data.batches import Batches, EvalSampler, eval_batches, train_batches
from train.data.cache import cache_folder
from train.data.counters import DataClock, DataCounters
from train.data.decode import render_tensor
from train.data.imagefolder import FileSet
from train.data.stream import LoaderOptions, Raw, SampleReader, StreamBatches, TensorSet
from train.data.tensors import TensorData, channel_stats, place
from train.dist import DistContext, local_main_first

log = logging.getLogger(__name__)
DEFAULT_FILE_IMAGE_SIZE = 224  # imagefolder and python datasets without data.image_size


@dataclass(frozen=True)
class DataFacts:
    """What the model and the console need to know of the data."""

    channels: int
    image_size: int  # the training resolution: what the model sees
    num_classes: int
    classes: list[str]
    train_samples: int
    test_samples: int
    loader: str  # "memory" or "stream"
    note: str  # the console's line about the path and why
    # (mean, std) per channel on the CPU, in 0-255 units, as the batches normalize; None:
    # images / 255
    stats: tuple[torch.Tensor, torch.Tensor] | None = None


class ClassNames:
    """The class names, saved in checkpoints; resuming with other classes is refused."""

    def __init__(self, names: list[str]):
        self.names = list(names)

    def state_dict(self) -> dict[str, list[str]]:
        return {"names": self.names}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise UserError(f"the checkpoint was trained on {len(state['names'])} classes "
                            f"({_few(state['names'])}) but the data now has {len(self.names)} "
                            f"({_few(self.names)}); restore the data, or set "
                            f"checkpoint.resume=false to start over")


def _few(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


@dataclass
class DataParts:
    train: Batches | StreamBatches
    test: Batches | StreamBatches
    facts: DataFacts
    counters: DataCounters  # a rank part: skipped files of the epoch
    classes: ClassNames  # a part: the class names
    held_out: FileSet | None = None  # the validation files data.val_fraction split off


def build_data(cfg: DataConfig, seed: int, ctx: DistContext, global_batch: int,
               eval_batch: int, channels_last: bool, pad_eval: bool = False,
               recorded_split: Path | None = None) -> DataParts:
    """Both splits' batches for this rank. One process per node downloads and decodes first
    (the others then find its files); errors are agreed, so one line reports them.
    `recorded_split`: the run's val_split.json (data.val_fraction), used when it exists."""
    first = ctx.local_rank == 0
    with local_main_first(ctx):
        train, test = open_datasets(cfg, seed, download=first, recorded_split=recorded_split)
        held_out = test if isinstance(test, FileSet) and test.subset else None
        native = train.image_size if isinstance(train, TensorData) else DEFAULT_FILE_IMAGE_SIZE
        augment = Augment(cfg, cfg.image_size or native, seed)
        loader, why = choose_loader(cfg, train, test, augment)
        if loader == "memory":
            train, test, skipped = _in_memory(cfg, train, test, augment, first)
        else:
            stats = _stream_stats(cfg, train, augment, seed, first)
    classes = train.classes or [str(i) for i in range(train.num_classes
                                                      if isinstance(train, TensorData) else 0)]
    counters = DataCounters(cfg.skip_bad_files)
    if loader == "memory":
        train, test = place(train, ctx.device, cfg.on_device), place(test, ctx.device,
                                                                      cfg.on_device)
        counters.fixed = skipped if ctx.is_main else 0
        reshape = augment.random or train.image_size != augment.size
        train_data: Any = train_batches(train, ctx.rank, ctx.world_size, global_batch, seed,
                                        ctx.device, channels_last,
                                        augment=augment.device_train if reshape else None)
        test_data: Any = eval_batches(test, ctx.rank, ctx.world_size, eval_batch, ctx.device,
                                      pad=pad_eval, channels_last=channels_last)
        note = f"in memory ({why}), batches gathered by index"
    else:
        train_data, test_data, note = _streams(cfg, ctx, train, test, augment, stats, seed,
                                               global_batch, eval_batch, channels_last,
                                               pad_eval, counters, why)
    if loader == "memory":
        stats = None if train.mean is None else (train.mean.cpu(), train.std.cpu())
    facts = DataFacts(train_data.data.channels, augment.size, len(classes), classes,
                      len(train_data.data), len(test_data.data), loader, note,
                      None if stats is None else (stats[0].cpu(), stats[1].cpu()))
    return DataParts(train_data, test_data, facts, counters, ClassNames(classes), held_out)


def choose_loader(cfg: DataConfig, train: Any, test: Any, augment: Augment) -> tuple[str, str]:
    """("memory" | "stream", why): auto holds what fits in data.memory_gb, decoded."""
    if cfg.loader != "auto":
        return cfg.loader, f"data.loader={cfg.loader}"
    if isinstance(train, TensorData):
        return "memory", "auto: the dataset is a tensor already"
    need = len(train) * train.channels * augment.stored_size ** 2 \
        + len(test) * test.channels * augment.size ** 2
    fits = need <= cfg.memory_gb * 2**30
    return ("memory" if fits else "stream"), (
        f"auto: {need / 2**30:.2f} GiB decoded {'<=' if fits else '>'} "
        f"data.memory_gb={cfg.memory_gb:g}")


def _in_memory(cfg: DataConfig, train: Any, test: Any, augment: Augment,
               first: bool) -> tuple[TensorData, TensorData, int]:
    """Both splits as tensors: training images as stored squares, evaluation ones rendered."""
    skipped = 0
    if isinstance(train, TensorData):
        view = augment.eval_view(test.image_size, test.images.shape[-2])
        test.images = render_tensor(test.images, view).contiguous()
    else:
        found = []
        for split, samples in (("stored", train), ("eval", test)):
            data, bad = materialize.in_memory(samples, augment, split, cfg.cache_dir,
                                              _fingerprint(cfg, samples, split), first,
                                              cfg.skip_bad_files)
            data.classes = train.classes
            found.append(data)
            skipped += bad
        train, test = found
    if cfg.normalize:
        train.mean, train.std = channel_stats(train.images)
        test = test.with_stats_of(train)
    return train, test, skipped


def _fingerprint(cfg: DataConfig, samples: Any, split: str) -> list[Any]:
    if hasattr(samples, "fingerprint"):
        return [samples.fingerprint(), cfg.decoder]
    return [cfg.name, cfg.factory, split, len(samples), cfg.decoder]


def _stream_stats(cfg: DataConfig, train: Any, augment: Augment, seed: int,
                  first: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not cfg.normalize:
        return None
    if isinstance(train, TensorData):
        return channel_stats(train.images)
    return materialize.stream_stats(train, augment, cfg.stats_samples, seed, cfg.cache_dir,
                                    _fingerprint(cfg, train, "train"), first,
                                    loader_processes(cfg, 1))


def loader_processes(cfg: DataConfig, workers_on_node: int) -> int:
    """data.num_workers, or the usable cores per worker less the one it trains on."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    return max(1, usable_cores() // max(1, workers_on_node) - 1)


def _streams(cfg: DataConfig, ctx: DistContext, train: Any, test: Any, augment: Augment,
             stats: Any, seed: int, global_batch: int, eval_batch: int, channels_last: bool,
             pad_eval: bool, counters: DataCounters, why: str) -> tuple[Any, Any, str]:
    if isinstance(train, TensorData):
        classes = train.classes or [str(i) for i in range(train.num_classes)]
        train, test = TensorSet(train, classes), TensorSet(test, classes)
    clock, caches = DataClock(), [None, None]
    if cfg.cache == "decoded":
        caches = [materialize.split_file(s, augment, split, cfg.cache_dir,
                                         _fingerprint(cfg, s, split))
                  for s, split in ((train, "stored"), (test, "eval"))]
        clock.caches = caches
    options = LoaderOptions(loader_processes(cfg, ctx.local_world_size),
                            ctx.device.type == "cuda" if cfg.pin_memory is None
                            else cfg.pin_memory, cfg.persistent_workers, cfg.prefetch_factor,
                            seed)
    train_sampler = DistributedSampler(range(len(train)), num_replicas=ctx.world_size,
                                       rank=ctx.rank, shuffle=True, seed=seed, drop_last=True)
    local = global_batch // ctx.world_size
    if len(train_sampler) < local:
        raise UserError(f"the training set ({len(train)} samples) is smaller than one global "
                        f"batch ({global_batch}); lower train.batch_size", agreed=True)
    eval_sampler: Sampler[int] = (
        DistributedSampler(range(len(test)), num_replicas=ctx.world_size, rank=ctx.rank,
                           shuffle=False) if pad_eval
        else EvalSampler(len(test), ctx.rank, ctx.world_size))
    device_op = augment.device_train if caches[0] is not None else None
    finish = DeviceFinish(stats, ctx.device, channels_last, counters)
    if cfg.decoder == "nvjpeg":
        train_data, test_data = _nvjpeg_streams(cfg, ctx, train, test, augment, finish, options,
                                                (train_sampler, eval_sampler), local,
                                                eval_batch, clock, counters)
    else:
        train_data = StreamBatches(
            SampleReader(train, augment, "stored" if caches[0] else "train", caches[0]),
            train_sampler, local, True, ctx.device, options, finish.with_op(device_op), clock,
            counters)
        test_data = StreamBatches(SampleReader(test, augment, "eval", caches[1]),
                                  eval_sampler, eval_batch, False, ctx.device, options, finish,
                                  clock, counters)
    pinned = "pinned" if options.pin_memory else "not pinned"
    cached = f", decoded cache in {cache_folder(cfg.cache_dir)}" if caches[0] else ""
    auto = "" if cfg.num_workers is not None else " (auto: usable cores per worker - 1)"
    note = (f"streamed ({why}): {options.num_workers} loader process(es) per worker{auto}, "
            f"batches {pinned}{cached}")
    return train_data, test_data, note


def _nvjpeg_streams(cfg: DataConfig, ctx: DistContext, train: Any, test: Any,
                    augment: Augment, finish: DeviceFinish, options: LoaderOptions,
                    samplers: tuple[Sampler[int], Sampler[int]], local: int, eval_batch: int,
                    clock: DataClock, counters: DataCounters) -> tuple[Any, Any]:
    """Loader processes read bytes; the GPU decodes (train/data/nvjpeg.py)."""
    from train.data.nvjpeg import BytesReader, NvjpegDecode, collate_bytes

    if ctx.device.type != "cuda" or not isinstance(train, FileSet) or cfg.cache != "none":
        raise UserError("data.decoder=nvjpeg decodes image folders on GPUs, on the stream "
                        "path without the decoded cache (data.name=imagefolder, "
                        "data.loader=stream, data.cache=none)", agreed=True)
    out = []
    for samples, split, sampler, size, drop in ((train, "train", samplers[0], local, True),
                                                (test, "eval", samplers[1], eval_batch, False)):
        reader = BytesReader(samples, augment, split)
        out.append(StreamBatches(reader, sampler, size, drop, ctx.device, options,
                                 NvjpegDecode(reader, ctx.device, finish), clock, counters,
                                 collate_bytes))
    return out[0], out[1]


class DeviceFinish:
    """A loader's uint8 batch -> the model's input on the device: the recipe's device part
    (decoded cache), normalization, memory format; bad samples counted or reported."""

    def __init__(self, stats: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device,
                 channels_last: bool, counters: DataCounters, op: Any = None):
        self.stats, self.device, self.counters, self.op = stats, device, counters, op
        self.channels_last = channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if stats is not None:
            self.mean, self.std = stats[0].to(device), stats[1].to(device)

    def with_op(self, op: Any) -> DeviceFinish:
        return DeviceFinish(self.stats, self.device, self.channels_last, self.counters, op)

    def __call__(self, raw: Raw, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, indices, bad = raw
        self.counters.met_bad(bad)
        if images is None:
            raise UserError(f"every sample of a batch was unreadable (first: {bad[0][1]})")
        images = images.to(self.device, non_blocking=True).float()
        if self.op is not None:
            images = self.op(images, indices.to(self.device, non_blocking=True), epoch)
        if self.stats is None:
            images = images.div_(255)
        else:
            images = images.sub_(self.mean).div_(self.std)
        return (images.contiguous(memory_format=self.memory_format),
                labels.to(self.device, non_blocking=True))
