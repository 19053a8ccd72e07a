"""The parts of `make gpu-check` and what they share: each runs in its own process (started by
the runner in tools/gpu_check/__init__.py), returns an Outcome, and never raises on purpose.

Runs go through the real launcher (`python -m launch`) with this machine's python, into
`reports/gpu-check/runs/`, each in a process group of its own that is killed at the part's
deadline. In the dry run (`ctx.dry`) the same commands run with `--cpu`, tiny sizes.
"""

from __future__ import annotations

import datetime
import importlib.util
import inspect
import json
import math
import platform
import sys
from pathlib import Path
from typing import Any

from tools.gpu_check import FAIL, PASS, REPO, Context, Outcome, environment
from tools.gpu_check.group import Finished, run_group

CONFIG = str(REPO / "configs" / "default.yaml")
MIN_TORCH = (2, 11)  # the oldest torch the project supports (the GPU machines' own)


def place(ctx: Context, workers: int = 1) -> tuple[list[str], list[str]]:
    """Launcher flags and overrides that put `workers` workers on the GPU (dry run: the CPU)."""
    if ctx.dry:
        return ["--cpu", "--gpus", str(workers)], ["dist.device=cpu"]
    return ["--gpus", str(workers)], ["dist.device=cuda"]


def launch(ctx: Context, run_dir: Path, flags: list[str], overrides: list[str],
           env: dict[str, str] | None = None) -> Finished:
    """`python -m launch FLAGS CONFIG OVERRIDES` as a user runs it; its process group is
    killed at the part's deadline (a little before: the part still reports)."""
    # No sync probe: one GPU has no sync to estimate, and its extra passes cost seconds.
    cmd = [sys.executable, "-m", "launch", *flags, CONFIG, "wandb.mode=disabled",
           "log.sync_probe=false", *overrides, f"run.dir={run_dir}"]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    return run_group(cmd, ctx.left_s() - 2, cwd=REPO, env={**environment(), **(env or {})})


def failed(what: str, result: Finished) -> Outcome:
    how = "stopped at the part's deadline" if result.timed_out else f"exit {result.returncode}"
    return Outcome(FAIL, f"{what}: {how}: {result.last_lines()}")


def params(run_dir: Path) -> dict[str, Any]:
    import torch

    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu",
                      weights_only=True)["model"]


def records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_figures(record: dict[str, Any]) -> dict[str, Any]:
    """What a GPU engineer reads first: throughput, peak memory, the step's phases."""
    phases = {p: record.get(f"time_{p}_ms") for p in ("data", "compute", "sync", "optim")}
    step = sum(v for v in phases.values() if v is not None)
    return {"images/s": record["samples_per_s"], "peak memory MiB": record["peak_memory_mb"],
            "step ms": step, **{f"{p} ms": v for p, v in phases.items()},
            "data wait %": 100 * (phases["data"] or 0) / step if step else None}


def describe(figures: dict[str, Any]) -> str:
    phases = ", ".join(f"{p} {figures[f'{p} ms']:.1f}" for p in ("data", "compute", "sync",
                                                                  "optim")
                       if figures[f"{p} ms"] is not None)
    return (f"{figures['images/s']:,.0f} images/s, peak {figures['peak memory MiB']:,.0f} MiB, "
            f"step {figures['step ms']:.1f} ms ({phases}), data wait "
            f"{figures['data wait %']:.1f}%")


# --- 1. what this machine has ---------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = sorted({torch.cuda.get_device_name(i) for i in range(gpus)})
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__, "CUDA": torch.version.cuda or "none (CPU build)",
            "cuDNN": torch.backends.cudnn.version() if gpus else "n/a",
            "NCCL": ".".join(map(str, torch.cuda.nccl.version())) if gpus else "n/a",
            "GPU count": gpus, "GPUs": ", ".join(names) or "none"}


def check_environment(ctx: Context) -> Outcome:
    """What the code needs from this torch, one line per missing piece; the machine's facts."""
    import torch
    import torch.distributed as dist
    from torch.distributed.run import get_args_parser

    from launch.cli import parse_args
    from launch.plan import make_plan

    facts, missing = machine_facts(), []
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if version < MIN_TORCH:
        missing.append(f"torch {torch.__version__} is older than the supported "
                       f"{'.'.join(map(str, MIN_TORCH))}")
    if "device_id" not in inspect.signature(dist.init_process_group).parameters:
        missing.append("init_process_group(device_id=...) (eager NCCL init)")
    plan = make_plan(parse_args([*place(ctx)[0], CONFIG, "wandb.mode=disabled",
                                 f"run.dir={ctx.out / 'runs' / 'plan'}"]))
    try:  # what broke every launch on torch 2.11: a flag its torchrun does not know
        get_args_parser().parse_args(plan.torchrun_args)
    except SystemExit:
        missing.append(f"torchrun does not take the launcher's flags {plan.torchrun_args[:-3]}")
    notes = [f"workers as planned: {plan.note}"]
    if importlib.util.find_spec("torch.distributed.flight_recorder") is None:
        notes.append("no torch.distributed.flight_recorder (reading NCCL traces needs it)")
    if importlib.util.find_spec("wandb") is None:
        notes.append("no wandb: wandb.mode=auto logs nothing")
    figures = {"facts": facts, "notes": notes}
    if missing:
        return Outcome(FAIL, "this torch lacks: " + "; ".join(missing), figures)
    return Outcome(PASS, f"torch {facts['torch']}, {facts['GPU count']} GPU(s) "
                         f"{facts['GPUs']}; " + "; ".join(notes), figures)


# --- 2. the first performance figure --------------------------------------------------------


def resnet50_speed(ctx: Context) -> Outcome:
    """ResNet-50 (torchvision), bf16 autocast, channels_last, batch 256 at 224 px, on synthetic
    images held on the GPU and resized there; the second epoch's figures (the first warms).
    Dry run: 32 px, batch 4, fp32."""
    size, batch, steps = (32, 4, 1) if ctx.dry else (224, 256, 12)
    run_dir = ctx.out / "runs" / "resnet50"
    overrides = [*place(ctx)[1], "model.name=torchvision.resnet50", "data.synthetic.channels=3",
                 "data.synthetic.image_size=32", f"data.image_size={size}",
                 f"data.synthetic.train_samples={batch * steps}",
                 f"data.synthetic.test_samples={batch}", f"train.batch_size={batch}",
                 # dry run: fp32, as a CPU without bf16 units runs bf16 ten times slower
                 "train.epochs=2", f"perf.precision={'fp32' if ctx.dry else 'bf16'}",
                 "perf.channels_last=true",
                 "log.every_steps=4"]
    result = launch(ctx, run_dir, place(ctx)[0], overrides)
    if result.returncode != 0:
        return failed("ResNet-50 bf16", result)
    last = records(run_dir)[-1]
    figures = {"batch": batch, "image size": size, "epoch": last["epoch"], **step_figures(last)}
    if not math.isfinite(last["train_loss"]):
        return Outcome(FAIL, f"loss {last['train_loss']}", figures)
    return Outcome(PASS, f"batch {batch} at {size} px, epoch 2: {describe(figures)}", figures)
