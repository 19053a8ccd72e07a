"""`make gpu-check`: what one lent GPU machine (one GPU, a few minutes) can prove about the GPU
path, in one command, into `reports/gpu-check/report.md` (and `report.json`): the machine's
torch against the launcher, ResNet-50's speed in bf16, a bitwise resume of the memory path with
augmentation, fsdp and zero with the GradScaler and clipping, the stream loader with nvjpeg,
compile with DDP, and two gloo workers sharing the GPU against one worker.

This module is the part runner and the report. Each part runs in a process of its own, in a
session of its own, within its own time budget: at the deadline the whole session is killed
(tools/gpu_check/group.py), so nothing a part started holds the GPU into the next part; a part
that fails, crashes or overruns is reported and the next one runs. `--cpu-dry-run` runs every
part in its CPU form (tiny sizes, `--cpu`), so the CPU suite catches what would break the
commands on the GPU machine. The parts are in tools/gpu_check/parts.py, exact.py and modes.py.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tools.gpu_check.group import run_group

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
# The dry run's budgets are the GPU's times this: a CPU runs the same starts (most of each
# part's time) several times slower, and a CI runner's two cores are shared.
DRY_SLACK = 3.0
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Outcome:
    """What a part found: its verdict, one line of detail, and its figures (for the report)."""

    status: str
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """What every part may read: the GPUs, the output folder, its deadline, the dry run."""

    gpus: int
    out: Path
    facts: dict[str, Any] = field(default_factory=dict)
    deadline: float = 0.0  # time.monotonic() (one clock for all processes) the part must end by
    dry: bool = False  # --cpu-dry-run: the CPU form of each part (tiny sizes, --cpu)

    def left_s(self) -> float:
        return max(1.0, self.deadline - time.monotonic())

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "out": str(self.out)}, default=str)

    @classmethod
    def from_json(cls, text: str) -> Context:
        values = json.loads(text)
        return cls(**{**values, "out": Path(values["out"])})


@dataclass(frozen=True)
class Part:
    name: str
    target: str  # "module:function" taking a Context, returning an Outcome
    budget_s: float  # at most this long, its start included; then its session is killed
    needs_gpu: bool = True  # without a GPU (and no dry run): skipped
    dry_skip: str = ""  # why the dry run leaves it out ("" : it has a CPU form)


@dataclass
class Result:
    name: str
    status: str
    detail: str
    seconds: float
    figures: dict[str, Any] = field(default_factory=dict)


def run_parts(parts: list[Part], ctx: Context, total_s: float,
              say: Callable[[str], None] = print) -> list[Result]:
    """Run every part in order within `total_s` seconds; never stop at a failing one."""
    ends = time.monotonic() + total_s
    results = []
    for i, part in enumerate(parts, start=1):
        label = f"gpu-check [{i}/{len(parts)}] {part.name}"
        started = time.monotonic()
        left = ends - started
        if ctx.dry and part.dry_skip:
            outcome = Outcome(SKIP, f"not in the dry run: {part.dry_skip}")
        elif part.needs_gpu and ctx.gpus == 0 and not ctx.dry:
            outcome = Outcome(SKIP, "no GPU visible (torch.cuda.device_count() is 0)")
        elif left < 5:
            outcome = Outcome(SKIP, f"no time left of the {total_s:.0f} s budget")
        else:
            budget = min(part.budget_s * (DRY_SLACK if ctx.dry else 1), left)
            say(f"{label} ... (up to {budget:.0f} s)")
            outcome = run_part(part, ctx, started + budget, say)
        seconds = time.monotonic() - started
        results.append(Result(part.name, outcome.status, outcome.detail, seconds,
                              outcome.figures))
        say(f"{label}: {outcome.status} ({seconds:.0f} s) {outcome.detail}")
    return results


def run_part(part: Part, ctx: Context, deadline: float,
             say: Callable[[str], None]) -> Outcome:
    """`python -m tools.gpu_check --run-part TARGET` in a session of its own until `deadline`;
    its Outcome comes back as a JSON file (a crash or an overrun is the part's FAIL)."""
    ctx.deadline, budget_s = deadline, deadline - time.monotonic()
    folder = ctx.out / "parts"
    folder.mkdir(parents=True, exist_ok=True)
    result = folder / f"{part.target.rsplit(':', 1)[-1]}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "tools.gpu_check", "--run-part", part.target,
           "--context", ctx.to_json(), "--result", str(result)]
    done = run_group(cmd, deadline - time.monotonic(), session=True, cwd=REPO,
                     env=environment(), echo=lambda line: say(f"  {line}"))
    (folder / result.name.replace(".json", ".log")).write_text(done.output)
    if done.timed_out:
        return Outcome(FAIL, f"ran past its budget ({budget_s:.0f} s): its processes were "
                             f"killed (last output: {done.last_lines()})")
    if not result.is_file():
        return Outcome(FAIL, f"crashed, exit {done.returncode}: {done.last_lines()}")
    saved = json.loads(result.read_text())
    return Outcome(saved["status"], saved["detail"], saved["figures"])


def environment() -> dict[str, str]:
    """For every process started here: the repo importable, TF32 off (bitwise parity)."""
    import os

    return {**os.environ, "PYTHONPATH": str(REPO), "NVIDIA_TF32_OVERRIDE": "0"}


# What the parts cannot show on the one GPU such a machine has (also in the docs, gpu page).
ONE_GPU_CANNOT = [
    "NCCL between GPUs: bandwidth, the ring's busbw, a collective timeout and its flight-recorder "
    "traces (NCCL refuses two ranks on one GPU; the two-worker checks run gloo on CUDA)",
    "fsdp and zero sharding across GPUs: with one rank every shard is the whole tensor, so the "
    "gathers, reduce-scatters and each rank's memory saving are not exercised",
    "DDP's gradient buckets overlapping NCCL with backward, and comm hooks on NCCL",
    "SyncBatchNorm over several GPUs, DataParallel's scatter and its per-GPU peaks",
    "several nodes (the launcher's rendezvous over a network)",
]


def write_report(results: list[Result], facts: dict[str, Any], folder: Path,
                 dry: bool = False) -> Path:
    """report.md (one line per check with its figures; what one GPU cannot prove) and
    report.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(
        {"facts": facts, "dry_run": dry, "parts": [asdict(r) for r in results]}, indent=2,
        default=str) + "\n")
    counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, SKIP)}
    lines = ["# GPU check" + (" (CPU dry run: the CPU form of each part, tiny sizes; no "
                              "figure here is a GPU's)" if dry else ""), "",
             f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped; "
             f"{sum(r.seconds for r in results):.0f} s in all.", "",
             "| fact | value |", "|---|---|"]
    lines += [f"| {key} | {_cell(_show(value))} |" for key, value in facts.items()]
    lines += ["", "| check | result | seconds | what it found |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.0f} | {_cell(r.detail)} |"
              for r in results]
    for r in results:
        shown = {k: v for k, v in r.figures.items() if k != "facts"}
        if shown:
            lines += ["", f"## {r.name}", "", *_figures(shown)]
    lines += ["", "## What one GPU cannot prove", "",
              *(f"- {item}" for item in ONE_GPU_CANNOT)]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _figures(figures: dict[str, Any]) -> list[str]:
    """A dict of figures as lines: tables stay tables (lists of dicts), the rest key: value."""
    lines: list[str] = []
    for key, value in figures.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            heads = list(value[0])
            lines += ["", f"{key}:", "", "| " + " | ".join(heads) + " |",
                      "|" + "---|" * len(heads)]
            lines += ["| " + " | ".join(_cell(_show(row.get(h))) for h in heads) + " |"
                      for row in value]
        elif isinstance(value, list):
            lines += ["", f"{key}:", *(f"- {_cell(_show(v))}" for v in value)]
        else:
            lines.append(f"- {key}: {_show(value)}")
    return lines


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)
