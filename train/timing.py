"""Where a step's time goes: waiting for data, forward+backward, gradient sync, optimizer.

On the CPU every operation finishes before the next Python line, so wall-clock timing of
each phase is exact and cheap. On a GPU, kernels run asynchronously: a phase is only timed
with a device synchronize on both sides, which stalls the pipeline, so only every
`sample_every`-th step is timed there.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterator

import torch

PHASES = ("data", "compute", "sync", "optim")


class StepTimer:
    def __init__(self, device: torch.device, sample_every: int | None = None):
        self.device = device
        self.sample_every = sample_every or (10 if device.type == "cuda" else 1)
        self.reset()

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.timed_steps = 0
        self.active = False
        self.current = ""  # the phase running now, for error messages

    def start_step(self, step: int) -> None:
        self.active = step % self.sample_every == 0
        if self.active:
            self.timed_steps += 1

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.current = name
        if not self.active:
            yield
            return
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.seconds[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        """Time measured elsewhere (e.g. our own allreduce), counted for timed steps only."""
        if self.active:
            self.seconds[name] += seconds

    def per_step_ms(self) -> dict[str, float]:
        n = max(1, self.timed_steps)
        return {name: 1000 * s / n for name, s in self.seconds.items()}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated on a GPU; the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
