"""DDP's sync probe: an estimate of the gradient sync that DDP hides inside backward, made at
epoch ends as often as it is cheap (the loop itself cannot see that sync: it overlaps compute).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from train.data.batches import Batches
from train.loop.parts import Schedule
from train.strategies.base import Strategy

# DDP's sync probe costs about two steps (two extra forward+backward passes): it runs at every
# epoch end when that is at most this share of the epoch, else once per run.
PROBE_BUDGET = 0.03


class SyncProbe:
    """The strategy's estimate of a sync hidden inside backward (DDP), at epoch ends, as often
    as it is cheap (`skipped` says when). Every rank decides alike: the probe communicates."""

    def __init__(self, strategy: Strategy, plan: Schedule,
                 autocast: Callable[[], contextlib.AbstractContextManager]):
        self.strategy, self.plan, self.autocast = strategy, plan, autocast
        self.probed = False  # a probe ran in this process
        self.settled = False  # the process's first step is behind it

    def at_epoch_end(self, model: nn.Module, batches: Batches,
                     whole: bool) -> tuple[float | None, str | None]:
        """(ms of sync per step, None), or (None, why it did not run); (None, None) for
        strategies that need no probe. `whole`: this process ran all `steps_per_epoch` steps
        of the epoch (not a resumed remainder, nor one that train.max_steps cut short)."""
        if not self.strategy.probes_sync:
            return None, None
        skipped = self.skipped(whole)
        if skipped:
            return None, skipped
        self.probed = True
        images, labels = next(batches.iterate())
        forward_backward = self._forward_backward(model, images, labels)
        return self.strategy.probe_sync_ms(model, forward_backward), None

    def settle(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
               step: int) -> None:
        """Called before every step; at the process's first, at optimizer step `step`, a
        resumed run (step > 0) lets the strategy settle its sync layout on this batch
        (train/strategies/ddp.py: settle_buckets)."""
        if not self.settled and step > 0:
            self.strategy.settle_buckets(model, self._forward_backward(model, images, labels))
        self.settled = True

    def _forward_backward(self, model: nn.Module, images: torch.Tensor,
                          labels: torch.Tensor) -> Callable[[], None]:
        def forward_backward() -> None:
            with self.autocast():
                loss = F.cross_entropy(model(images), labels)
            loss.backward()

        return forward_backward

    def skipped(self, whole: bool) -> str | None:
        """Why the probe does not run at this epoch's end, or None when it does."""
        plan, passes = self.plan, self.strategy.probe_passes
        if not plan.sync_probe:
            return "log.sync_probe=false"
        if plan.total_steps < plan.steps_per_epoch:
            return "the run is shorter than one epoch"
        if not whole:
            return "a partial epoch"
        if passes <= PROBE_BUDGET * plan.steps_per_epoch or not self.probed:
            return None
        return (f"once per run: its {passes} passes cost more than {PROBE_BUDGET:.0%} of a "
                f"{plan.steps_per_epoch}-step epoch")
