"""`python -m tools.gpu_check [--out reports/gpu-check] [--budget-s 330] [--cpu-dry-run]`
(`make gpu-check`).

Runs with whatever python starts it (`make gpu-check PY=python3`: the machine's own, no venv,
nothing downloaded), prints each part's progress, keeps going past a failing part, and writes
report.md and report.json. Exit 0 when no part failed, 1 otherwise. `--cpu-dry-run` runs each
part's CPU form (what CI runs on torch 2.11 without a GPU). `--run-part` is internal: one part,
in the process the runner started for it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import traceback
from pathlib import Path

from tools.gpu_check import DRY_SLACK, FAIL, REPO, Context, Outcome, Part, run_parts, write_report
from tools.gpu_check.group import become_subreaper

# Budgets in seconds, each part's process start included; together 320 s: with this runner's
# own start, under the 6 minutes a lent GPU machine gives the check (the machine's own start
# is outside them).
BUDGET_S = 330
ENVIRONMENT = Part("torch on this machine", "tools.gpu_check.parts:check_environment", 20,
                   needs_gpu=False)
PARTS = [
    Part("ResNet-50 bf16, batch 256", "tools.gpu_check.parts:resnet50_speed", 45),
    Part("memory path + augmentation: SIGTERM, resume bitwise",
         "tools.gpu_check.exact:resume_bitwise", 70),
    Part("2 gloo workers sharing the GPU vs 1 worker", "tools.gpu_check.exact:parity", 30),
    Part("fsdp bf16 and zero fp16 (GradScaler, clipping)", "tools.gpu_check.modes:sharded", 40),
    Part("stream loader: pinned batches, nvjpeg", "tools.gpu_check.modes:stream_nvjpeg", 45),
    Part("torch.compile with DDP", "tools.gpu_check.exact:compiled", 70),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_check",
                                     description="Check the GPU path on this machine.")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "gpu-check")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for all parts together (default 330: with the start, "
                             "under 6 minutes; dry run: 3 times that)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="every part in its CPU form, tiny sizes: no GPU needed")
    parser.add_argument("--run-part", help=argparse.SUPPRESS)
    parser.add_argument("--context", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    become_subreaper()  # what a part leaves behind stays ours to end (tools/gpu_check/group.py)
    if args.run_part:
        return run_one(args.run_part, Context.from_json(args.context), args.result)
    out = args.out.absolute()
    for stale in ("runs", "parts", "data"):  # a run folder left from last time would resume
        shutil.rmtree(out / stale, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(0, out, dry=args.cpu_dry_run)
    total = args.budget_s or BUDGET_S * (DRY_SLACK if ctx.dry else 1)
    results = run_parts([ENVIRONMENT], ctx, total, say)
    ctx.facts = results[0].figures.get("facts", {})
    ctx.gpus = 0 if ctx.dry else int(ctx.facts.get("GPU count", 0))
    results += run_parts(PARTS, ctx, total - results[0].seconds, say)
    report = write_report(results, ctx.facts, out, dry=ctx.dry)
    failed = [r.name for r in results if r.status == FAIL]
    print(f"gpu-check: {report}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def say(line: str) -> None:
    print(line, flush=True)


def run_one(target: str, ctx: Context, result: Path) -> int:
    """In the part's own process: run it, write its Outcome (a crash is its FAIL)."""
    import importlib

    module, name = target.split(":")
    try:
        outcome = getattr(importlib.import_module(module), name)(ctx)
    except Exception as exc:  # noqa: BLE001 - a crash is this part's result
        where = traceback.extract_tb(exc.__traceback__)[-1]
        outcome = Outcome(FAIL, f"crashed: {type(exc).__name__}: {exc} "
                                f"({Path(where.filename).name}:{where.lineno})")
    result.write_text(json.dumps({"status": outcome.status, "detail": outcome.detail,
                                  "figures": outcome.figures}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
