"""The training paths, one file each: `single` (one process), `ddp`, `dp`, `scratch`, `fsdp`."""

from __future__ import annotations

from common.errors import UserError
from common.schema import Config
from train.dist import DistContext
from train.strategies.base import Single, Strategy


def make_strategy(cfg: Config, ctx: DistContext) -> Strategy:
    """The strategy for `cfg.mode` in this process (a lone process needs no sync)."""
    if cfg.mode == "dp":
        from train.strategies.dp import DataParallel

        if ctx.distributed:
            raise UserError("mode dp runs ONE process that drives every GPU; start it with "
                            "`python -m launch --mode dp` (not torchrun, not several nodes)",
                            agreed=True)
        return DataParallel(ctx)
    if not ctx.distributed:
        return Single(ctx)
    if cfg.mode == "scratch":
        from train.strategies.scratch import Scratch

        strategy: Strategy = Scratch(ctx, cfg.scratch)
    elif cfg.mode == "fsdp":
        from train.strategies.fsdp import FSDP

        strategy = FSDP(ctx, cfg.fsdp, cfg.perf.precision)
    else:
        from train.strategies.ddp import DDP

        strategy = DDP(ctx, cfg.ddp)
    return alone(strategy) if ctx.world_size == 1 else strategy


def alone(strategy: Strategy) -> Strategy:
    """One worker under torchrun: nothing to synchronize, so no sync time (n/a, not the cost of
    a collective with itself) and no DDP sync probe (its extra passes would measure nothing)."""
    strategy.probes_sync = strategy.measures_sync = False
    strategy.sync_method = "n/a: one worker, nothing to synchronize"
    return strategy


__all__ = ["Single", "Strategy", "make_strategy"]
