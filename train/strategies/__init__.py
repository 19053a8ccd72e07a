"""The training paths, one file each: `single` (one process), `ddp`, `dp`, `scratch`, `fsdp`.

`STRATEGIES` maps a mode to its builder. Each builder imports its module when called: FSDP's
and DDP's import torch.distributed's fsdp / parallel machinery, which a run of another mode
(and `python -m train --help`) need not load.
"""

from __future__ import annotations

from collections.abc import Callable

from common.errors import UserError
from common.schema import Config
from train.dist import DistContext
from train.strategies.base import Single, Strategy


def _ddp(cfg: Config, ctx: DistContext) -> Strategy:
    from train.strategies.ddp import DDP

    return DDP(ctx, cfg.ddp)


def _scratch(cfg: Config, ctx: DistContext) -> Strategy:
    from train.strategies.scratch import Scratch

    return Scratch(ctx, cfg.scratch)


def _fsdp(cfg: Config, ctx: DistContext) -> Strategy:
    from train.strategies.fsdp import FSDP

    return FSDP(ctx, cfg.fsdp, cfg.perf.precision)


def _dp(cfg: Config, ctx: DistContext) -> Strategy:
    from train.strategies.dp import DataParallel

    if ctx.distributed:
        raise UserError("mode dp runs ONE process that drives every GPU; start it with "
                        "`python -m launch --mode dp` (not torchrun, not several nodes)",
                        agreed=True)
    return DataParallel(ctx)


# mode -> builder; one process (no torchrun) needs no sync: `Single`, except for dp, whose one
# process drives every GPU.
STRATEGIES: dict[str, Callable[[Config, DistContext], Strategy]] = {
    "ddp": _ddp, "scratch": _scratch, "fsdp": _fsdp, "dp": _dp}


def make_strategy(cfg: Config, ctx: DistContext) -> Strategy:
    """The strategy for `cfg.mode` in this process (a lone process needs no sync)."""
    if cfg.mode != "dp" and not ctx.distributed:
        return Single(ctx)
    strategy = STRATEGIES[cfg.mode](cfg, ctx)
    return alone(strategy) if ctx.world_size == 1 and cfg.mode != "dp" else strategy


def alone(strategy: Strategy) -> Strategy:
    """One worker under torchrun: nothing to synchronize, so no sync time (n/a, not the cost of
    a collective with itself) and no DDP sync probe (its extra passes would measure nothing)."""
    strategy.probes_sync = strategy.measures_sync = False
    strategy.sync_method = "n/a: one worker, nothing to synchronize"
    return strategy


__all__ = ["STRATEGIES", "Single", "Strategy", "make_strategy"]
