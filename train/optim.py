"""The optimizer side of a step: optimizer, learning-rate schedule, AMP autocast and scaler."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from common.schema import OptimConfig

log = logging.getLogger(__name__)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def scaled_lr(cfg: OptimConfig, world_size: int) -> float:
    """`optim.lr` times the world size (linear rule, Goyal et al.) or its square root (sqrt
    rule), for recipes that grow the global batch with the number of workers."""
    factor = {"none": 1.0, "linear": world_size, "sqrt": math.sqrt(world_size)}[cfg.scale_lr]
    return cfg.lr * factor


def lr_factor(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Multiplier of `optim.lr` for the update after `step` updates: linear warmup, then
    constant or cosine down to `optim.min_lr` at `total_steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class LRSchedule:
    """The learning-rate schedule; a checkpointed part, saved as LambdaLR's own state.

    A resume takes the position (the steps done) from the checkpoint and the schedule from this
    config. For the same config that is the very LR the run would have used; a run continued
    with checkpoint.allow_changes=true (more epochs, another optim.lr) follows the schedule
    recomputed over its new length from the current step, as timm and Lightning do: a cosine
    that had reached its end rises to where the longer cosine is at this step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
        self.optimizer = optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(lr_factor, cfg, total_steps=total_steps))

    def step(self) -> None:
        self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """After the optimizer's (whose param_groups carry the old run's LR)."""
        base_lrs = list(self.scheduler.base_lrs)  # this config's peak LR
        self.scheduler.load_state_dict(state)
        self.scheduler.base_lrs = base_lrs
        step = self.scheduler.last_epoch
        saved = [group["lr"] for group in self.optimizer.param_groups]
        lrs = [base * fn(step) for fn, base in zip(self.scheduler.lr_lambdas, base_lrs,
                                                   strict=True)]
        for group, base, lr in zip(self.optimizer.param_groups, base_lrs, lrs, strict=True):
            group["initial_lr"], group["lr"] = base, lr
        self.scheduler._last_lr = lrs  # what get_last_lr() reports
        if saved != lrs:
            log.info("learning rate recomputed for this config from step %d: %.4g (the "
                     "checkpoint's schedule: %.4g)", step, lrs[0], saved[0])


@dataclass
class Optimization:
    """What turns gradients into an update; `parts()` are checkpointed."""

    optimizer: torch.optim.Optimizer
    scheduler: LRSchedule
    scaler: torch.amp.GradScaler
    device_type: str
    autocast_dtype: torch.dtype | None

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.autocast_dtype,
                              enabled=self.autocast_dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def parts(self) -> dict[str, Any]:
        """The checkpointed parts besides the optimizer, which the strategy hands the
        checkpointer (FSDP's is in pieces across the ranks)."""
        parts: dict[str, Any] = {"scheduler": self.scheduler}
        if self.scaler.is_enabled():  # fp16: its scale and growth tracker
            parts["scaler"] = self.scaler
        return parts


class OptimizerHooks(Protocol):
    """How a strategy builds the optimizer and the loss scaler (train/strategies/base.py)."""

    def build_optimizer(self, params: Iterable[nn.Parameter], optimizer_class: type,
                        **defaults: Any) -> torch.optim.Optimizer: ...

    def grad_scaler(self, device_type: str, enabled: bool) -> torch.amp.GradScaler: ...


def build_optimization(cfg: OptimConfig, precision: str, model: nn.Module, world_size: int,
                       total_steps: int, device_type: str,
                       hooks: OptimizerHooks) -> Optimization:
    """SGD over `model`'s parameters (after the strategy wrapped it: FSDP's are shards), its
    schedule and, for fp16, a loss scaler."""
    optimizer = hooks.build_optimizer(model.parameters(), torch.optim.SGD,
                                      lr=scaled_lr(cfg, world_size), momentum=cfg.momentum,
                                      weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    scheduler = LRSchedule(optimizer, cfg, total_steps)
    scaler = hooks.grad_scaler(device_type, enabled=precision == "fp16")
    return Optimization(optimizer, scheduler, scaler, device_type,
                        AUTOCAST_DTYPES.get(precision))
