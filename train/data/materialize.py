"""Datasets of files or Python samples brought into memory (data.loader=memory), and the
normalization statistics of streamed ones.

Both decode through a decoded file (train/data/cache.py) that the node's first worker fills
with loader processes while the others wait (train/dist.py's `local_main_first`): one decode
per node, and a restart finds the work done.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
from torch.utils.data import DataLoader

from common.errors import UserError, outside
from common.files import atomic_write
from common.host import usable_cores
from train.data.augment import Augment
from train.data.cache import DecodedFile, cache_path
from train.data.loader_server import loader_context, start_loader
from train.data.stream import SampleReader
from train.data.tensors import TensorData, channel_stats

log = logging.getLogger(__name__)
_CHUNK = 64  # samples per loader task


def decode_all(reader: SampleReader, indices: list[int],
               workers: int) -> list[tuple[int, torch.Tensor | None, int, str, bool]]:
    """Render `indices` (before training) with loader processes; items in index order."""
    chunks = [[(-1, i) for i in indices[k:k + _CHUNK]] for k in range(0, len(indices), _CHUNK)]
    loader = DataLoader(reader, batch_sampler=chunks, num_workers=workers, collate_fn=list,
                        multiprocessing_context=loader_context() if workers else None)
    return [item for chunk in start_loader(loader) for item in chunk]


def split_file(samples: Any, augment: Augment, split: str, cache_dir: str,
               fingerprint: Any) -> DecodedFile:
    """The decoded file of one split: stored squares ("stored") or evaluation views ("eval")."""
    size = augment.stored_size if split == "stored" else augment.size
    params = [split, size, augment.imagenet.eval_crop if augment.name == "imagenet" else 1.0]
    return DecodedFile(cache_path(cache_dir, [fingerprint, params]), len(samples),
                       (samples.channels, size, size))


def fill(file: DecodedFile, reader: SampleReader, workers: int) -> None:
    """Decode every slot the file does not hold yet (the node's first worker only)."""
    missing = file.untrusted_all()
    if missing:
        log.info("decoding %d images into %s (%d loader processes)", len(missing), file.path,
                 workers)
        for index, image, label, problem, fatal in decode_all(reader, missing, workers):
            if fatal:
                raise UserError(problem)
            file.write(index, image, label, -1)
    file.make_durable(0)


def in_memory(samples: Any, augment: Augment, split: str, cache_dir: str, fingerprint: Any,
              first_on_node: bool, skip_bad_files: bool) -> tuple[TensorData, int]:
    """The whole split as a TensorData (bad files left out when skipping), and how many were."""
    file = split_file(samples, augment, split, cache_dir, fingerprint)
    if first_on_node:
        fill(file, SampleReader(samples, augment, split), usable_cores())
    flags = file.flag_values()
    bad = (flags < 0).nonzero()[:, 0]
    if len(bad) and not skip_bad_files:
        raise UserError(f"cannot decode {samples.describe(int(bad[0]))} ({len(bad)} such in "
                        f"{split if split == 'eval' else 'train'}); fix or remove the file, or "
                        f"set data.skip_bad_files=true to leave unreadable files out")
    keep = (flags > 0).nonzero()[:, 0]
    if len(keep) + len(bad) != len(samples):
        raise UserError(f"the decoded file {file.path} is incomplete (another process changed "
                        f"it?); delete it and start again")
    images, labels = file.gather(keep)
    return TensorData(images, labels, len(samples.classes)), len(bad)


def stream_stats(samples: Any, augment: Augment, cfg_samples: int, seed: int, cache_dir: str,
                 fingerprint: Any, first_on_node: bool,
                 workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (0..255 units) of a fixed random subset of the training set,
    as stored squares; computed by the node's first worker and kept beside the caches."""
    path = cache_path(cache_dir, [fingerprint, "stats", augment.stored_size, cfg_samples, seed])
    path = path.with_suffix(".stats.json")
    if first_on_node and not path.is_file():
        count = min(cfg_samples, len(samples))
        pick = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
        items = decode_all(SampleReader(samples, augment, "stored"),
                           sorted(pick[:count].tolist()), workers)
        fatal = next((it[3] for it in items if it[4]), None)
        if fatal:  # a malformed sample of the user's dataset stops the run, here as in training
            raise UserError(fatal)
        good = [it[1] for it in items if it[1] is not None]
        if not good:
            raise UserError(f"none of {count} training images could be decoded (first: "
                            f"{items[0][3]})")
        mean, std = channel_stats(torch.stack(good))
        # data.cache_dir is the user's path: a file there, no permission, a full disk.
        with outside(f"writing the training set's statistics into data.cache_dir "
                     f"{path.parent}"):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda p: p.write_text(json.dumps(
                {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()})))
    with outside(f"reading the training set's statistics {path}",
                 hint="delete the file to compute them again"):
        stats = json.loads(path.read_text())
    shape = (1, -1, 1, 1)
    return torch.tensor(stats["mean"]).view(shape), torch.tensor(stats["std"]).view(shape)
