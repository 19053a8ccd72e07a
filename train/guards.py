"""Guards around the loop: stop requests, replica sync checks, the sample ledger.

Each guard takes its decision on every rank alike (from gathered data, or from one agreed
flag), so a rank never stops or raises alone while the others wait in a collective.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from common.errors import EXIT_INTERRUPTED, CheckFailed
from common.records import LEDGER_FILE
from common.schema import CheckConfig
from train.dist import DistContext

log = logging.getLogger(__name__)


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop stops at a step boundary that all ranks agree on.

    Ranks get the signal at slightly different moments; stopping where each one happens to be
    would leave the others waiting in the next gradient allreduce. Every `every` steps the
    ranks combine their flags with one small all_reduce(MAX). A worker that has not exited
    `grace_s` seconds after the signal exits anyway.
    """

    def __init__(self, ctx: DistContext, grace_s: float, every: int = 5):
        self.ctx, self.every, self.grace_s = ctx, every, grace_s
        self.requested = 0  # the signal number, 0 when none
        # Called (signal, seconds) when half the grace has passed without a step boundary:
        # the rank's hang record (train/hang.py), on disk before torchrun's SIGKILL can come.
        self.on_overdue: Callable[[int, float], None] | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            return
        self.requested = signum
        # A worker that cannot reach a step boundary (stuck in a stalled collective, or
        # stalled itself) would otherwise live until torchrun's SIGKILL.
        watchdog = threading.Timer(self.grace_s, os._exit, args=(EXIT_INTERRUPTED,))
        watchdog.daemon = True
        watchdog.start()
        if self.on_overdue is not None:
            report = threading.Timer(self.grace_s / 2, self.on_overdue,
                                     args=(signum, self.grace_s / 2))
            report.daemon = True
            report.start()

    def should_stop(self, step: int, force_check: bool = False) -> bool:
        if not self.ctx.distributed:
            return bool(self.requested)
        if step % self.every and not force_check:
            return False
        flag = torch.tensor([self.requested], dtype=torch.int64, device=self.ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.requested:
            self.requested = int(flag.item())
        return bool(flag.item())


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
        names, params = zip(*model.named_parameters(), strict=True)
        mine = torch.stack([p.detach().double().sum() for p in params] +
                           [p.detach().double().square().sum() for p in params])
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
