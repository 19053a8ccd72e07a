"""The learning rate: its peak (optim.lr scaled by workers or by the global batch) and its
schedule over the run (linear warmup, then constant, cosine or step)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.run_length import warmup_in_steps
from common.schema import OptimConfig

# The global batch `optim.lr` was tuned for when optim.lr_base_batch is not given (timm's
# lr_base_size).
LR_BASE_BATCH = 256


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    """`optim.lr` scaled by the global batch over the batch it was tuned for (`lr_base_batch`,
    default 256): linearly (Goyal et al.; `lr_base_batch` alone asks for this too) or by the
    square root; as given with neither set. `train.batch_size` is the global batch, so the
    rate does not depend on the worker count: a config trains the same on 2 and 8 GPUs."""
    rule = cfg.scale_lr
    if rule == "none":
        if cfg.lr_base_batch is None:
            return cfg.lr
        rule = "linear"
    ratio = global_batch / (cfg.lr_base_batch or LR_BASE_BATCH)
    return cfg.lr * (ratio if rule == "linear" else math.sqrt(ratio))


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
