"""Functions that the strategy tests run inside real worker processes (importable by name):
collectives counted by wrapping torch.distributed's own functions around the real ones."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as tdist

from tests.workers import DEFAULT_CONFIG, _trainer
from train import dist
from train.config import load_config


@contextlib.contextmanager
def counting(name: str) -> Iterator[list[int]]:
    """Count the calls of `torch.distributed.<name>` (each still runs for real)."""
    real, calls = getattr(tdist, name), [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    setattr(tdist, name, counted)
    try:
        yield calls
    finally:
        setattr(tdist, name, real)


def fsdp_buffer_broadcasts(overrides: list[str], steps: int) -> dict:
    """Train `steps` steps on data that differs per rank: the broadcasts of each step and the
    buffers after them."""
    cfg = load_config(DEFAULT_CONFIG, overrides)
    ctx = dist.setup(cfg.dist)
    try:
        trainer = _trainer(cfg, ctx)
        local = cfg.train.batch_size // ctx.world_size
        generator = torch.Generator().manual_seed(ctx.rank)
        per_step = []
        for _ in range(steps):
            images = torch.randn(local, 1, 28, 28, generator=generator)
            labels = torch.randint(0, 10, (local,), generator=generator)
            with counting("broadcast") as calls:
                trainer.train_step(images, labels)
            per_step.append(calls[0])
        buffers = {name: b.detach().clone() for name, b in trainer.plain.named_buffers()}
        return {"per_step": per_step, "buffers": buffers}
    finally:
        dist.teardown(ctx)
