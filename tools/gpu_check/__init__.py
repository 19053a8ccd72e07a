"""`make gpu-check`: everything about the GPU path in one command, for the day a GPU machine is
lent (often one GPU, for minutes): the `gpu` tests, a short real training run on every visible
GPU, a SIGTERM-and-resume round, parity of 1 GPU against all of them, and NCCL's allreduce
bandwidth, into `reports/gpu-check/report.md` (and `report.json`).

This module is the part runner and the report: each part gets a share of the time budget, a
part that fails or crashes is reported and the next one runs, and parts that need a GPU are
skipped (and say so) on a machine without one. The parts are in tools/gpu_check/parts.py.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


@dataclass
class Outcome:
    """What a part found: its verdict, one line of detail, and its figures (for the report)."""

    status: str
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """What every part may read: the machine's facts, the output folder, its time limit."""

    gpus: int
    out: Path
    facts: dict[str, Any]
    deadline: float = 0.0  # time.monotonic() by which the running part must be done
    shared: dict[str, Any] = field(default_factory=dict)  # results later parts reuse

    def left_s(self) -> float:
        return max(1.0, self.deadline - time.monotonic())


@dataclass(frozen=True)
class Part:
    name: str
    run: Callable[[Context], Outcome]
    budget_s: float  # at most this long (subprocess timeouts inside the part use `left_s`)
    needs_gpu: bool = True


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
        if part.needs_gpu and ctx.gpus == 0:
            outcome = Outcome(SKIP, "no GPU visible (torch.cuda.device_count() is 0)")
        elif left < 5:
            outcome = Outcome(SKIP, f"no time left of the {total_s:.0f} s budget")
        else:
            say(f"{label} ... (up to {min(part.budget_s, left):.0f} s)")
            ctx.deadline = started + min(part.budget_s, left)
            try:
                outcome = part.run(ctx)
            except Exception as exc:  # noqa: BLE001 - a crash is this part's result, not ours
                where = traceback.extract_tb(exc.__traceback__)[-1]
                outcome = Outcome(FAIL, f"crashed: {type(exc).__name__}: {exc} "
                                        f"({Path(where.filename).name}:{where.lineno})")
        seconds = time.monotonic() - started
        results.append(Result(part.name, outcome.status, outcome.detail, seconds,
                              outcome.figures))
        say(f"{label}: {outcome.status} ({seconds:.0f} s) {outcome.detail}")
    return results


def write_report(results: list[Result], facts: dict[str, Any], folder: Path) -> Path:
    """report.md (what passed, failed, was skipped and why; the figures) and report.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(
        {"facts": facts, "parts": [asdict(r) for r in results]}, indent=2, default=str) + "\n")
    counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, SKIP)}
    lines = ["# GPU check", "",
             f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped; "
             f"{sum(r.seconds for r in results):.0f} s in all.", "",
             "| fact | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in facts.items()]
    lines += ["", "| part | result | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.0f} | {_cell(r.detail)} |"
              for r in results]
    for r in results:
        if r.figures:
            lines += ["", f"## {r.name}", "", *_figures(r.figures)]
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
