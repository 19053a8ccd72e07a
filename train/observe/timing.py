"""Where a step's time goes: waiting for data, forward+backward, gradient sync, optimizer.

On the CPU every operation finishes before the next Python line, so wall-clock timing of
each phase is exact and cheap. On a GPU, kernels run asynchronously: a phase is only timed
with a device synchronize on both sides, which stalls the pipeline, so only every
`sample_every`-th step is timed there.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
import time
from collections.abc import Iterator

import torch

from common.collectives import synchronize
from common.records import PHASES

log = logging.getLogger(__name__)


class StepTimer:
    """Per-phase step times of an epoch, and the epoch's peak memory on `devices` (those the
    process computes on: dp drives several)."""

    def __init__(self, device: torch.device, sample_every: int | None = None,
                 devices: list[torch.device] | None = None):
        self.device, self.devices = device, devices or [device]
        self.sample_every = sample_every or (10 if device.type == "cuda" else 1)
        self.reset()

    def reset(self) -> None:
        """At an epoch's start: no time counted, the GPUs' peak-memory counters afresh."""
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.timed_steps = 0
        self.active = False
        reset_peak_memory(self.devices)

    def clock(self) -> float:
        """perf_counter() once the GPU's queued work is done: an epoch's time then counts its
        steps' kernels, not only their launches."""
        synchronize(self.device)
        return time.perf_counter()

    def peak_memory_mb(self) -> list[float]:
        """Each device's peak since `reset` (on the CPU: the process's peak so far)."""
        return [peak_memory_mb(device) for device in self.devices]

    def start_step(self, step: int) -> None:
        self.active = step % self.sample_every == 0
        if self.active:
            self.timed_steps += 1

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.active:
            yield
            return
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.seconds[name] += time.perf_counter() - start

    def per_step_ms(self) -> dict[str, float]:
        n = max(1, self.timed_steps)
        return {name: 1000 * s / n for name, s in self.seconds.items()}

    def _sync(self) -> None:
        synchronize(self.device)


class CompileClock:
    """torch.compile compiles in this process's first step: that time, less a normal step's
    (the second), is compile time, taken out of the epoch's time and its compute phase."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.steps_s: list[float] = []
        self.first_step_timed = False
        self.pending_s = 0.0  # compile time not yet taken out of an epoch's time

    def note_step(self, seconds: float, timer: StepTimer) -> None:
        if not self.enabled or len(self.steps_s) >= 2:
            return
        self.steps_s.append(seconds)
        if len(self.steps_s) == 1:
            self.first_step_timed = timer.active
            return
        self.pending_s = max(0.0, self.steps_s[0] - seconds)
        if self.first_step_timed:  # ...nor as compute time in the step-time breakdown
            timer.seconds["compute"] = max(0.0, timer.seconds["compute"] - self.pending_s)
        log.info("torch.compile took about %.1f s (the first step minus the second)",
                 self.pending_s)

    def take(self) -> float:
        """The compile time to leave out of this epoch (then zero for the next)."""
        seconds, self.pending_s = self.pending_s, 0.0
        return seconds


def reset_peak_memory(devices: list[torch.device]) -> None:
    """Start the GPUs' peak-memory counters afresh (each epoch reports its own peak). The CPU's
    peak resident memory cannot be reset: there it is the process's peak so far."""
    for device in devices:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated on a GPU (since the last reset); the process's peak resident memory
    on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
