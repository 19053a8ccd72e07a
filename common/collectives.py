"""Timing device work and collectives, alike in the doctor, the benchmarks and the workers."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist


def time_collective(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` runs, all ranks starting together; the slowest
    rank's (a collective is as slow as its slowest rank)."""
    fn()  # warm-up (connections, allocations)
    times = []
    for _ in range(repeats):
        dist.barrier()
        times.append(timed(fn, device))
    # On the collective's own device: NCCL takes no CPU tensors.
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.item()


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a GPU runs kernels after the Python line that
    asked for them); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds of `fn`, with the GPU's queued work finished on both sides."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start
