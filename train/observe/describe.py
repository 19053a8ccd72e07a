"""The console's words for a strategy: where the workers run and how they synchronize (the
first line of a run). The strategies hold the facts (their config, their dtype); the text is
here, beside the console that prints it."""

from __future__ import annotations

from common.host import visible_gpus
from train.strategies.base import Strategy


def placement(strategy: Strategy) -> str:
    ctx = strategy.ctx
    if strategy.name == "dp":
        gpus = visible_gpus()
        if gpus == 0:
            return "DataParallel on the CPU: there are no GPUs to split the batch over"
        return f"DataParallel over {gpus} GPU(s) in one process"
    if strategy.name == "single":
        return f"one process on {ctx.device.type}"
    return f"{ctx.world_size} x {ctx.device.type} ({ctx.backend})"


def describe(strategy: Strategy) -> str:
    """Placement, CPU threads, then what the mode's own options make of the sync."""
    ctx, where = strategy.ctx, placement(strategy)
    if ctx.device.type == "cpu":
        threads = ctx.cpu_threads
        where += f", {threads} thread{'' if threads == 1 else 's'}"
        where += " each" if ctx.world_size > 1 else ""
    return where + _sync_details(strategy)


def _sync_details(strategy: Strategy) -> str:
    cfg = getattr(strategy, "cfg", None)
    if strategy.name == "ddp" and cfg.zero:
        return "; optimizer state in one shard per rank (ZeRO)"
    if strategy.name == "scratch":
        bucket = "per parameter" if cfg.per_parameter else f"{cfg.bucket_mb:g} MiB"
        return f"; our {cfg.algorithm} allreduce, buckets {bucket}"
    if strategy.name == "fsdp":
        dtype = strategy.param_dtype
        mixed = (f", gathered in {str(dtype).removeprefix('torch.')}, gradients reduced in "
                 f"fp32" if dtype else "")
        return (f"; parameters, gradients and optimizer state in {strategy.ctx.world_size} "
                f"shards{mixed}")
    return ""
