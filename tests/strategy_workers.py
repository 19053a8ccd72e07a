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
        buffers = {name: b.detach().clone() for name, b in trainer.parts.plain.named_buffers()}
        return {"per_step": per_step, "buffers": buffers}
    finally:
        dist.teardown(ctx)


def zero_under_a_grad_scaler(bucket_view: bool | None) -> dict:
    """fp16's protocol on the CPU (GradScaler("cpu") and torch's fused SGD, which take it on
    the CPU too): DDP with ZeRO (its parameters in flat buckets or not), or with a plain
    optimizer (`bucket_view` None); a step whose gradients hold an inf in the middle. The
    parameters after each step, the scale, how often GradScaler took its host-syncing path
    (`_maybe_opt_step`: reads found-inf back before stepping), the broadcasts of each step."""
    from torch import nn

    from train.strategies import make_strategy
    from train.strategies.zero import ZeroOptimizer

    cfg = load_config(DEFAULT_CONFIG, ["dist.device=cpu"])
    ctx = dist.setup(cfg.dist)
    try:
        strategy = make_strategy(cfg, ctx)
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        model = strategy.wrap(plain)
        build = (torch.optim.SGD if bucket_view is None else
                 lambda params, **kw: ZeroOptimizer(params, torch.optim.SGD, bucket_view, **kw))
        optimizer = build(plain.parameters(), lr=0.1, momentum=0.9, fused=True)
        scaler = strategy.grad_scaler("cpu", enabled=True)
        synced, host_path = [0], scaler._maybe_opt_step

        def counted(*args, **kwargs):
            synced[0] += 1
            return host_path(*args, **kwargs)

        scaler._maybe_opt_step = counted
        generator = torch.Generator().manual_seed(ctx.rank)
        params, scales, broadcasts = [], [], []
        for step in range(4):
            loss = model(torch.randn(6, 8, generator=generator)).square().mean()
            scaler.scale(loss).backward()
            if step == 2:  # an overflow: every rank's gradients (after the allreduce) hold it
                next(plain.parameters()).grad[0, 0] = float("inf")
            with counting("broadcast") as calls:
                scaler.step(optimizer)
            broadcasts.append(calls[0])
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            params.append([p.detach().clone() for p in plain.parameters()])
            scales.append(scaler.get_scale())
        return {"params": params, "scales": scales, "host_syncing_steps": synced[0],
                "broadcasts": broadcasts,
                "supports": getattr(optimizer, "_step_supports_amp_scaling", False)}
    finally:
        dist.teardown(ctx)
