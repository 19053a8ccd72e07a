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

        return Scratch(ctx, cfg.scratch)
    if cfg.mode == "fsdp":
        from train.strategies.fsdp import FSDP

        return FSDP(ctx, cfg.fsdp, cfg.perf.precision)
    from train.strategies.ddp import DDP

    return DDP(ctx, cfg.ddp)


__all__ = ["Single", "Strategy", "make_strategy"]
