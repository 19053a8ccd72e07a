"""Guards around the loop: stop requests, replica sync checks, the sample ledger.

Each guard takes its decision on every rank alike (from gathered data, or from one agreed
flag), so a rank never stops or raises alone while the others wait in a collective.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from common.errors import CheckFailed
from common.records import LEDGER_FILE
from common.schema import CheckConfig
from common.signals import stop_signals
from train.dist import DistContext

log = logging.getLogger(__name__)
T = TypeVar("T")


class StopRequest:
    """A stop signal (SIGTERM, SIGINT, SIGHUP, SIGUSR1) ends the loop at a step boundary all
    ranks agree on.

    Ranks get the signal at slightly different moments; stopping where each one happens to be
    would leave the others waiting in the next gradient allreduce. Every `every` steps the
    ranks combine their flags with one small all_reduce(MAX), read back once (on a GPU that
    waits for the queued steps: there `every` is the logging interval, whose loss is read back
    on the same steps anyway). The signals themselves are watched from the worker's first line
    (common/signals.py): a rank that shows no progress after the signal (stalled, or waiting
    for a stalled peer) exits on its own.
    """

    def __init__(self, ctx: DistContext, every: int = 5):
        self.ctx, self.every = ctx, every
        self.signals = stop_signals()
        # One flag on the collective's device, reused: no new tensor per check.
        self.flag = torch.zeros(1, dtype=torch.int64, device=ctx.device)

    @property
    def on_overdue(self) -> Callable[[int, float], None] | None:
        """Called (signal, seconds) from the watcher once half the stall limit has passed
        without progress after a stop signal: the rank's hang record (train/run/hang.py), on disk
        before the rank exits or torchrun's SIGKILL comes."""
        return self.signals.on_overdue

    @on_overdue.setter
    def on_overdue(self, report: Callable[[int, float], None] | None) -> None:
        self.signals.on_overdue = report

    @property
    def requested(self) -> int:
        """The signal's number, 0 when none."""
        return self.signals.requested

    def begin(self) -> None:
        """The loop starts: a signal from now on is a stop request, no longer an exit."""
        self.signals.begin_training()

    def alive(self) -> None:
        self.signals.alive()

    def each_alive(self, items: Iterator[T]) -> Iterator[T]:
        """Each item done is a sign of progress (evaluation: a stopping rank is not stalled)."""
        for item in items:
            yield item
            self.signals.alive()

    def busy(self) -> contextlib.AbstractContextManager:
        """Around a checkpoint write, which the stall limit must not cut short."""
        return self.signals.busy()

    def should_stop(self, step: int, force_check: bool = False) -> bool:
        self.signals.alive()  # called after every step
        if not self.ctx.distributed:
            return bool(self.requested)
        if step % self.every and not force_check:
            return False
        self.flag.fill_(self.requested)
        dist.all_reduce(self.flag, op=dist.ReduceOp.MAX)
        agreed = int(self.flag.item())
        if agreed and not self.requested:
            self.signals.requested = agreed
        return bool(agreed)


class SyncChecker:
    """Every N steps, compare a checksum of the parameters across ranks; stop at a divergence.

    Replicas that apply the same averaged gradients stay bitwise equal. A bug in the gradient
    sync (d2l #955: a copy that replaced instead of writing in place) lets them drift apart
    silently; this catches it within N steps and names the rank.
    """

    def __init__(self, cfg: CheckConfig, ctx: DistContext):
        self.every, self.ctx = cfg.sync_every_steps, ctx

    def after_step(self, model: nn.Module, step: int) -> None:
        if not self.every or not self.ctx.distributed or step % self.every:
            return
        # Sharded parameters (mode fsdp) are no replicas: each rank holds another piece.
        replicated = [(n, p) for n, p in model.named_parameters() if not _is_dtensor(p)]
        if not replicated:
            return
        names, params = zip(*replicated, strict=True)
        mine = torch.stack([p.detach().double().sum() for p in params] +
                           [p.detach().double().square().sum() for p in params])
        if self.ctx.backend == "gloo":
            mine = mine.cpu()  # gloo's own device (CUDA workers may run on gloo too)
        everyone = [torch.empty_like(mine) for _ in range(self.ctx.world_size)]
        dist.all_gather(everyone, mine)
        for rank, theirs in enumerate(everyone[1:], start=1):
            if not torch.equal(theirs, everyone[0]):
                first = int((theirs != everyone[0]).nonzero()[0]) % len(params)
                raise CheckFailed(f"replicas diverged by step {step}: rank {rank}'s parameters "
                                  f"differ from rank 0's (first: {names[first]}); the gradient "
                                  f"sync is broken", agreed=True)


class SampleLedger:
    """Which sample indices each rank trained and evaluated on, checked every epoch.

    Train shards must be disjoint and together cover the samples of the steps taken; the
    order must change from one epoch to the next (a forgotten `set_epoch` repeats it).
    Evaluation must count every test sample exactly once (no `DistributedSampler` padding).
    Written to `sample_ledger.jsonl` in the run folder.
    """

    def __init__(self, cfg: CheckConfig, ctx: DistContext, folder: Path | None):
        self.enabled, self.ctx = cfg.sample_ledger, ctx
        self.path = folder / LEDGER_FILE if folder is not None else None
        self.previous: list[list[int]] | None = None

    def check_train(self, epoch: int, seen: list[int], steps: int, global_batch: int) -> None:
        if not self.enabled:
            return
        ranks = self._gather(seen)
        together = [i for r in ranks for i in r]
        problems = []
        if len(set(together)) != len(together):
            problems.append(f"{len(together) - len(set(together))} samples trained on twice")
        if len(together) != steps * global_batch:
            problems.append(f"{len(together)} samples seen for {steps} steps of {global_batch}")
        if self.previous is not None and ranks == self.previous and steps > 1:
            problems.append("the same order as the previous epoch on every rank "
                            "(sampler.set_epoch not called?)")
        self.previous = ranks
        self._write({"epoch": epoch, "split": "train", "ranks": ranks, "problems": problems})
        if problems:
            raise CheckFailed(f"sample ledger, epoch {epoch} (train): " + "; ".join(problems),
                              agreed=True)

    def check_eval(self, epoch: int, seen: list[int], total: int) -> None:
        if not self.enabled:
            return
        ranks = self._gather(seen)
        together = sorted(i for r in ranks for i in r)
        problems = []
        if together != list(range(total)):
            extra = len(together) - len(set(together))
            missing = total - len(set(together))
            problems.append(f"test samples counted twice: {extra}, never: {missing}")
        self._write({"epoch": epoch, "split": "test", "ranks": ranks, "problems": problems})
        if problems:
            raise CheckFailed(f"sample ledger, epoch {epoch} (test): " + "; ".join(problems),
                              agreed=True)

    def _gather(self, seen: list[int]) -> list[list[int]]:
        if not self.ctx.distributed:
            return [list(seen)]
        ranks: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(ranks, list(seen))
        return ranks

    def _write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _is_dtensor(tensor: torch.Tensor) -> bool:
    """Without importing torch.distributed.tensor (a second): a process that never imported
    it holds no DTensor."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)
