"""The parts of `make gpu-check` that compare runs, and NCCL's bandwidth.

A deterministic 1-GPU run is the reference (made once): a run stopped by SIGTERM and resumed
must equal it bit for bit; the same run on every GPU (on a single GPU: two gloo workers sharing
it) must equal it up to summation order.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from common.spawn import spawn
from tools.gpu_check import FAIL, PASS, Context, Outcome
from tools.gpu_check.parts import (
    REPO,
    environment,
    last_lines,
    launch,
    launch_command,
    params,
    records,
)

SIZES = [2**20, 8 * 2**20, 64 * 2**20, 256 * 2**20]  # bytes of float32, as nccl-tests sweeps
# 24 steps inside the first epoch; the stop lands at step 15 (stop checks every logged step).
STALL = ["debug.stall_rank=0", "debug.stall_step=12", "debug.stall_seconds=5"]


def parity_workers(ctx: Context) -> tuple[int, list[str], str]:
    """Workers, overrides and a label for the all-GPUs side of the parity."""
    if ctx.gpus >= 2:
        return ctx.gpus, [], f"{ctx.gpus} GPUs with NCCL"
    return 2, ["dist.backend=gloo"], "2 gloo workers sharing the one GPU (NCCL needs one each)"


def exact(ctx: Context) -> list[str]:
    """The reference schedule, with a global batch every parity worker count divides."""
    workers = parity_workers(ctx)[0]
    return ["wandb.mode=disabled", "perf.deterministic=true", "train.max_steps=24",
            "log.every_steps=5", f"train.batch_size={workers * (256 // workers)}"]


def reference(ctx: Context) -> Path:
    """The uninterrupted deterministic run on one GPU, made by the first part that needs it."""
    if "reference" not in ctx.shared:
        run_dir = ctx.out / "runs" / "reference-1gpu"
        ctx.shared["reference"] = run_dir, launch(ctx, run_dir, ["--gpus", "1"], exact(ctx))
    run_dir, result = ctx.shared["reference"]
    if result.returncode != 0:
        raise RuntimeError(f"the 1-GPU reference run failed, exit {result.returncode}: "
                           f"{last_lines(result)}")
    return run_dir


def differences(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, bool, bool]:
    """(largest absolute difference, bitwise equal, equal up to rtol 1e-3 / atol 1e-4)."""
    import torch

    largest = max(float((a[k] - b[k]).abs().max()) for k in b)
    bitwise = all(torch.equal(a[k], b[k]) for k in b)
    close = all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-4) for k in b)
    return largest, bitwise, close


def sigterm_and_resume(ctx: Context) -> Outcome:
    """SIGTERM to the launcher mid-epoch (as SLURM sends it), then the same command again."""
    import torch

    whole = reference(ctx)
    run_dir = ctx.out / "runs" / "resumed"
    proc = subprocess.Popen(launch_command(run_dir, ["--gpus", "1"], [*exact(ctx), *STALL]),
                            cwd=REPO, env=environment(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    sent = False
    for line in proc.stdout:
        if "step 10/" in line:  # the worker then stalls 5 s in step 12: the signal lands there
            proc.send_signal(signal.SIGTERM)
            sent = True
            break
    _, err = proc.communicate(timeout=ctx.left_s())
    if not sent or proc.returncode != 130:
        return Outcome(FAIL, f"expected exit 130 after SIGTERM (sent: {sent}), got "
                             f"{proc.returncode}: {err.strip().splitlines()[-1:]}")
    stopped = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu",
                         weights_only=True)["step"]
    again = launch(ctx, run_dir, ["--gpus", "1"], exact(ctx))
    if again.returncode != 0 or "resumed from" not in again.stdout:
        return Outcome(FAIL, f"resume: exit {again.returncode}: {last_lines(again)}")
    largest, bitwise, _ = differences(params(run_dir), params(whole))
    same_records = [r["train_loss"] for r in records(run_dir)] == [
        r["train_loss"] for r in records(whole)]
    figures = {"stopped after step": stopped, "bitwise equal to the uninterrupted run": bitwise,
               "largest parameter difference": largest, "same epoch records": same_records}
    if not (bitwise and same_records):
        return Outcome(FAIL, f"resumed from step {stopped}, but differs from the uninterrupted "
                             f"run by up to {largest:.3g}", figures)
    return Outcome(PASS, f"stopped at step {stopped} with exit 130, resumed, bitwise equal to "
                         f"the uninterrupted run", figures)


def parity(ctx: Context) -> Outcome:
    """The reference schedule on one GPU against every GPU (the same global batch)."""
    whole = reference(ctx)
    workers, extra, label = parity_workers(ctx)
    run_dir = ctx.out / "runs" / f"parity-{workers}"
    result = launch(ctx, run_dir, ["--gpus", str(workers)], [*exact(ctx), *extra])
    if result.returncode != 0:
        return Outcome(FAIL, f"{label}: exit {result.returncode}: {last_lines(result)}")
    largest, bitwise, close = differences(params(run_dir), params(whole))
    figures = {"compared": f"1 GPU against {label}, 24 steps", "largest difference": largest,
               "bitwise": bitwise}
    verdict = PASS if close else FAIL
    return Outcome(verdict, f"1 GPU vs {label}: parameters differ by up to {largest:.2g} "
                            f"({'within' if close else 'beyond'} rtol 1e-3, atol 1e-4)", figures)


def nccl_bandwidth(ctx: Context) -> Outcome:
    rows = spawn(nccl_allreduce, ctx.gpus, SIZES, timeout=ctx.left_s(),
                 env={"NVIDIA_TF32_OVERRIDE": "0"})[0]
    top = rows[-1]
    note = ("; one GPU: NCCL moves nothing between GPUs, so busbw is 0 by definition and algbw "
            "is a copy on the device") if ctx.gpus == 1 else ""
    return Outcome(PASS, f"{ctx.gpus} GPU(s), {top['bytes'] // 2**20} MiB: algbw "
                         f"{top['algbw GB/s']:.1f} GB/s, busbw {top['busbw GB/s']:.1f} GB/s"
                         f"{note}", {"all_reduce, float32, median of 10 (5 above 64 MiB)": rows})


def nccl_allreduce(sizes: list[int]) -> list[dict[str, Any]]:
    """In each spawned process: dist.all_reduce on NCCL, nccl-tests' algbw and busbw (the
    bytes every rank sends, 2(n-1)/n of the data, over the time), the slowest rank's time."""
    # Late, torch and what imports it: the runner (tools/gpu_check/__init__.py) imports this
    # module, and a torch that fails to import must be a part's FAIL, not the runner's crash.
    import torch
    import torch.distributed as dist

    from common.collectives import time_collective

    rank = int(os.environ["RANK"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    try:
        n = dist.get_world_size()
        probe = torch.full((8,), float(rank + 1), device=device)
        dist.all_reduce(probe)
        if not bool((probe == n * (n + 1) / 2).all()):
            raise RuntimeError(f"all_reduce summed to {probe[0].item()}")
        rows = []
        for size in sizes:
            data = torch.ones(size // 4, device=device)
            seconds = time_collective(lambda d=data: dist.all_reduce(d), device,
                                      10 if size <= 64 * 2**20 else 5)
            algbw = size / seconds
            rows.append({"bytes": size, "ms": seconds * 1e3, "algbw GB/s": algbw / 1e9,
                         "busbw GB/s": algbw * 2 * (n - 1) / n / 1e9})
        return rows
    finally:
        dist.destroy_process_group()
