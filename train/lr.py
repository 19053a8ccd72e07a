"""The learning rate: its peak (optim.lr scaled by workers or by the global batch) and its
schedule over the run (linear warmup, then constant, cosine or step)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.run_length import warmup_in_steps
from common.schema import OptimConfig


def peak_lr(cfg: OptimConfig, world_size: int, global_batch: int) -> float:
    """`optim.lr` times the world size (linear rule, Goyal et al.) or its square root (sqrt
    rule), or times global batch / `lr_base_batch` (timm's rule); as given otherwise."""
    if cfg.lr_base_batch is not None:
        return cfg.lr * global_batch / cfg.lr_base_batch
    factor = {"none": 1.0, "linear": world_size, "sqrt": math.sqrt(world_size)}[cfg.scale_lr]
    return cfg.lr * factor


@dataclass(frozen=True)
class LrPlan:
    """The multiplier of the peak lr at each step, in steps."""

    schedule: str  # constant | cosine | step
    warmup: int  # steps of linear warmup
    total: int  # the run's optimizer steps
    steps_per_epoch: int
    floor: float  # cosine's end, as a fraction of the peak
    milestones: tuple[int, ...]  # step schedule: epochs
    gamma: float

    @classmethod
    def of(cls, cfg: OptimConfig, peak: float, total: int, steps_per_epoch: int) -> LrPlan:
        warmup = warmup_in_steps(cfg, steps_per_epoch)
        return cls(cfg.schedule, warmup, total, steps_per_epoch, cfg.min_lr / peak,
                   tuple(cfg.milestones), cfg.gamma)

    def __call__(self, step: int) -> float:
        """Multiplier for the update after `step` updates."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "step":
            epoch = step // self.steps_per_epoch
            return self.gamma ** sum(epoch >= m for m in self.milestones)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))
