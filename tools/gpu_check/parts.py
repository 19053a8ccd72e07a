"""The parts of `make gpu-check`, in the order they run; each returns an Outcome and never
raises on purpose (a crash is caught and reported by the runner in tools/gpu_check/__init__.py).

Runs go through the real launcher (`python -m launch`) with this machine's python, into
`reports/gpu-check/runs/`. Parity and resume runs are deterministic (`perf.deterministic=true`,
TF32 off), so that a resumed run can be compared with an uninterrupted one bit for bit.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from tools.gpu_check import FAIL, PASS, Context, Outcome

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "default.yaml")
# The deterministic reference schedule: 40 steps inside the first epoch (93 steps of 256).
EXACT = ["wandb.mode=disabled", "perf.deterministic=true", "train.max_steps=40",
         "log.every_steps=5"]
TEST_LINE = re.compile(r"^(tests/\S+::\S+(?:\[.*?\])?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)"
                       r"(?: \((.*)\))?")


def environment() -> dict[str, str]:
    """For every process started here: the repo importable, TF32 off (bitwise parity)."""
    return {**os.environ, "PYTHONPATH": str(REPO), "NVIDIA_TF32_OVERRIDE": "0"}


def launch_command(run_dir: Path, flags: list[str], overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "launch", *flags, CONFIG, *overrides, f"run.dir={run_dir}"]


def launch(ctx: Context, run_dir: Path, flags: list[str],
           overrides: list[str]) -> subprocess.CompletedProcess:
    """`python -m launch FLAGS CONFIG OVERRIDES` as a user runs it, within the part's time."""
    return subprocess.run(launch_command(run_dir, flags, overrides), cwd=REPO,
                          env=environment(), text=True, capture_output=True,
                          timeout=ctx.left_s())


def last_lines(result: subprocess.CompletedProcess, n: int = 2) -> str:
    lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
    return " / ".join(lines[-n:])[:400]


def params(run_dir: Path) -> dict[str, Any]:
    import torch

    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu",
                      weights_only=True)["model"]


def records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- 1. what this machine has ---------------------------------------------------------------


def check_environment(ctx: Context) -> Outcome:
    """What the code needs from this torch: one line per missing piece."""
    # Late, torch and the launcher (which imports torch): a torch that fails to import is
    # this part's FAIL in the report, not a crash of the runner before any part ran.
    import torch.distributed as dist
    from torch.distributed.run import get_args_parser

    from launch.cli import parse_args
    from launch.plan import make_plan

    missing = []
    if "device_id" not in inspect.signature(dist.init_process_group).parameters:
        missing.append("init_process_group(device_id=...) (eager NCCL init)")
    plan = make_plan(parse_args([CONFIG, "wandb.mode=disabled",
                                 f"run.dir={ctx.out / 'runs' / 'plan'}"]))
    try:
        get_args_parser().parse_args(plan.torchrun_args)
    except SystemExit:
        missing.append(f"torchrun does not take the launcher's flags {plan.torchrun_args[:-3]}")
    notes = [f"workers as planned: {plan.note}"]
    if importlib.util.find_spec("torch.distributed.flight_recorder") is None:
        notes.append("no torch.distributed.flight_recorder (reading NCCL traces needs it)")
    if importlib.util.find_spec("wandb") is None:
        notes.append("no wandb: wandb.mode=auto logs nothing")
    if missing:
        return Outcome(FAIL, "this torch lacks: " + "; ".join(missing), {"notes": notes})
    return Outcome(PASS, "; ".join(notes))


# --- 2. the gpu tests -----------------------------------------------------------------------


def run_gpu_tests(ctx: Context) -> Outcome:
    """`pytest -m gpu`, its progress shown, within the part's time; what did not pass, named."""
    log_path, junit = ctx.out / "gpu-tests.log", ctx.out / "gpu-tests.xml"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-v", "-p", "no:cacheprovider",
           f"--junitxml={junit}", f"--basetemp={ctx.out / 'pytest'}"]
    seen, collected = 0, None
    with log_path.open("w") as log, subprocess.Popen(
            cmd, cwd=REPO, env=environment(), text=True, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT) as proc:
        timer = threading.Timer(ctx.left_s(), proc.kill)
        timer.start()
        for line in proc.stdout:
            log.write(line)
            if (found := TEST_LINE.match(line)):
                seen += 1
                print(f"  {found[2]:<7} {found[1]}", flush=True)
            elif (count := re.search(r"collected (\d+) items / (\d+) deselected", line)):
                collected = int(count[1]) - int(count[2])
        timer.cancel()
    if proc.returncode == -signal.SIGKILL or not junit.is_file():
        return Outcome(FAIL, f"stopped at the part's time limit ({seen} of {collected or '?'} "
                             f"tests done; progress in {log_path})")
    passed, failed, skipped = junit_results(junit)
    reasons = sorted({r for _, r in skipped})
    figures: dict[str, Any] = {
        "passed": len(passed), "failed": failed or ["none"],
        "skipped, by reason": [f"{sum(r == reason for _, r in skipped)} x {reason}"
                               for reason in reasons] or ["none"], "log": str(log_path)}
    detail = f"{len(passed)} passed, {len(failed)} failed, {len(skipped)} skipped"
    if proc.returncode not in (0, 5) or failed:  # 5: nothing collected
        return Outcome(FAIL, f"{detail} (pytest exit {proc.returncode}; see {log_path})",
                       figures)
    return Outcome(PASS, detail, figures)


def junit_results(path: Path) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """(passed, failed with their first message line, (skipped, reason)) from pytest's XML."""
    import xml.etree.ElementTree as ElementTree

    passed, failed, skipped = [], [], []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        problem = case.find("failure")
        problem = problem if problem is not None else case.find("error")
        skip = case.find("skipped")
        if problem is not None:
            failed.append(f"{name}: {(problem.get('message') or '').splitlines()[0][:200]}")
        elif skip is not None:
            skipped.append((name, (skip.get("message") or "").removeprefix("Skipped: ")))
        else:
            passed.append(name)
    return passed, failed, skipped


# --- 3. a real training run on every GPU ----------------------------------------------------


def train_on_every_gpu(ctx: Context) -> Outcome:
    run_dir = ctx.out / "runs" / "train"
    result = launch(ctx, run_dir, [], ["train.epochs=2", "wandb.mode=disabled"])
    if result.returncode != 0:
        return Outcome(FAIL, f"exit {result.returncode}: {last_lines(result)}")
    last = records(run_dir)[-1]
    keys = ("world_size", "samples_per_s", "epoch_time_s", "train_loss", "test_accuracy",
            "time_compute_ms", "time_sync_ms", "peak_memory_mb", "peak_memory_mb_max")
    figures = {k: last[k] for k in keys}
    if not math.isfinite(last["train_loss"]) or last["world_size"] != ctx.gpus:
        return Outcome(FAIL, f"trained, but world size {last['world_size']}, loss "
                             f"{last['train_loss']}", figures)
    return Outcome(PASS, f"{ctx.gpus} GPU worker(s), {last['samples_per_s']:,.0f} samples/s, "
                         f"test accuracy {last['test_accuracy']:.2%} after 2 epochs", figures)
