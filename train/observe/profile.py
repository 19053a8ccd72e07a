"""`perf.profile_steps=A-B`: a torch.profiler trace of optimizer steps A to B on every rank.

Each rank writes `run.dir/profile/rank_<r>.trace.json` (Chrome trace format: chrome://tracing
or ui.perfetto.dev open it), with tensor shapes and memory allocations recorded; the main rank
also writes `top_ops.txt` (torch's table of every operator) and prints the top operators by
self time. The step before A, when this process runs it, is a warm-up step that is not
recorded (the profiler's own start-up would otherwise land in step A).

The Trainer calls `step_begins`/`step_ends` around every step and `close` at the end;
`NoProfiler`, the default, does nothing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from common.records import PROFILE_DIR
from common.run_length import profile_range

log = logging.getLogger(__name__)
TOP_OPS = 10  # operators printed on the console


class NoProfiler:
    """No perf.profile_steps: every hook does nothing."""

    def step_begins(self, step: int) -> None:
        """`step`: the 1-based number of the optimizer step about to run."""

    def step_ends(self, step: int) -> None:
        """`step`: the step just completed."""

    def close(self) -> None:
        """The loop ended (finished, or stopped inside the window)."""


class StepProfiler(NoProfiler):
    """Profiles steps `first`..`last` of this process's share of the run."""

    def __init__(self, first: int, last: int, folder: Path, rank: int, is_main: bool,
                 device: torch.device):
        self.first, self.last = first, last
        self.folder, self.rank, self.is_main = folder / PROFILE_DIR, rank, is_main
        self.device = device
        self.profiler: torch.profiler.profile | None = None
        self.recorded: list[int] = []  # the steps inside the trace
        self.done = False

    def step_begins(self, step: int) -> None:
        if self.profiler is not None or self.done or not self.first - 1 <= step <= self.last:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        # Kineto logs its stages and, on a CUDA build without a GPU, a failed device count
        # as ERROR lines; level 5 keeps only its start/stop lines.
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        warmup = 1 if step < self.first else 0
        active = self.last - max(step, self.first) + 1
        # Counted from `step`, so that the trace's ProfilerStep#N are the run's step numbers.
        self.profiler = torch.profiler.profile(
            activities=activities, record_shapes=True, profile_memory=True,
            schedule=torch.profiler.schedule(skip_first=step, wait=0, warmup=warmup,
                                             active=active, repeat=1),
            on_trace_ready=self._ready)
        self.profiler.step_num = step
        self.profiler.start()

    def step_ends(self, step: int) -> None:
        if self.profiler is None:
            return
        if step >= self.first:
            self.recorded.append(step)
        self.profiler.step()
        if step >= self.last:
            self.close()

    def close(self) -> None:
        if self.profiler is not None:
            profiler, self.profiler = self.profiler, None
            profiler.stop()  # a window cut short still saves the steps it recorded
        self.done = True

    def _ready(self, profiler: torch.profiler.profile) -> None:
        if not self.recorded:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / f"rank_{self.rank}.trace.json"
        profiler.export_chrome_trace(str(trace))
        if not self.is_main:
            return
        averages = profiler.key_averages()
        sort_by = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        (self.folder / "top_ops.txt").write_text(averages.table(sort_by=sort_by) + "\n")
        steps = f"{self.recorded[0]}-{self.recorded[-1]}"
        log.info("profile of steps %s (rank 0; a trace of every rank in %s):\n%s", steps,
                 self.folder, top_operators(averages, self.device.type == "cuda",
                                            len(self.recorded)))


def top_operators(averages: Any, on_gpu: bool, steps: int, limit: int = TOP_OPS) -> str:
    """The operators with the most self time (device time on GPUs), per profiled step."""
    def self_us(event: Any) -> float:
        return event.self_device_time_total if on_gpu else event.self_cpu_time_total

    def total_us(event: Any) -> float:
        return event.device_time_total if on_gpu else event.cpu_time_total

    ops = [e for e in averages if not e.key.startswith("ProfilerStep")]
    everything = sum(self_us(e) for e in ops) or 1.0
    ops.sort(key=self_us, reverse=True)
    width = max([len("operator")] + [len(e.key) for e in ops[:limit]])
    clock = "device" if on_gpu else "cpu"
    lines = [f"  {'operator':<{width}}  calls/step  self {clock} ms/step  total ms/step  self %"]
    for e in ops[:limit]:
        lines.append(f"  {e.key:<{width}}  {e.count / steps:>10.1f}  "
                     f"{self_us(e) / 1e3 / steps:>18.3f}  {total_us(e) / 1e3 / steps:>13.3f}  "
                     f"{100 * self_us(e) / everything:>5.1f}%")
    return "\n".join(lines)


def make_profiler(profile_steps: str, folder: Path, rank: int, is_main: bool,
                  device: torch.device) -> NoProfiler:
    """A StepProfiler for perf.profile_steps (already checked against the run's length)."""
    if not profile_steps:
        return NoProfiler()
    first, last = profile_range(profile_steps)
    return StepProfiler(first, last, folder, rank, is_main, device)
