"""The parts of `make gpu-check` that compare runs with a deterministic reference.

The reference: LeNet, 24 steps of batch 128 with cifar's augmentation drawn on the GPU, the
dataset held on the GPU, one worker. The same run from host memory (pinned staging, the copy on
a side stream), stopped by SIGTERM and resumed, must equal it bit for bit; two gloo workers
sharing the GPU, and the compiled model, must equal it up to summation order and fusion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.records import SUMMARY_FILE
from tools.gpu_check import FAIL, PASS, Context, Outcome
from tools.gpu_check.parts import failed, launch, params, place, records

TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}
STOP = ["debug.sigterm_rank=0", "debug.sigterm_step=8"]  # agreed at the next logged step, 10


def exact(ctx: Context) -> list[str]:
    """The reference schedule: 2 epochs of 12 steps (dry run: tiny samples, the same steps)."""
    train, test, batch = (192, 16, 16) if ctx.dry else (1536, 301, 128)
    return ["data.synthetic.channels=3", "data.synthetic.image_size=32", "data.augment=cifar",
            f"data.synthetic.train_samples={train}", f"data.synthetic.test_samples={test}",
            f"train.batch_size={batch}", "train.epochs=2", "log.every_steps=5",
            "perf.deterministic=true", "checkpoint.every_steps=4"]


def reference(ctx: Context) -> Path:
    """The uninterrupted run, made by the first part that needs it, reused by the others."""
    run_dir = ctx.out / "runs" / "reference"
    if not (run_dir / SUMMARY_FILE).is_file():
        result = launch(ctx, run_dir, place(ctx)[0], [*place(ctx)[1], *exact(ctx)])
        if result.returncode != 0:
            raise RuntimeError(failed("the reference run", result).detail)
    return run_dir


def differences(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, bool, bool]:
    """(largest absolute difference, bitwise equal, equal within TOLERANCE)."""
    import torch

    largest = max(float((a[k].double() - b[k].double()).abs().max()) for k in b)
    bitwise = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    close = all(torch.allclose(a[k], b[k], **TOLERANCE) for k in b)
    return largest, bitwise, close


def step_of(run_dir: Path) -> int:
    import torch

    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu",
                      weights_only=True)["step"]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train_loss"]) for r in records(run_dir)]


def resume_bitwise(ctx: Context) -> Outcome:
    """The dataset in host memory with augmentation on (train/data/prefetch.py), SIGTERM at
    step 8, the same command again: bitwise the run that held its dataset on the GPU."""
    whole = reference(ctx)
    run_dir = ctx.out / "runs" / "resumed"
    flags, overrides = place(ctx)
    host = [*overrides, *exact(ctx), "data.on_device=false"]
    stopped = launch(ctx, run_dir, flags, [*host, *STOP])
    if stopped.returncode != 130:  # 128 + SIGINT: the launcher's "stopped, checkpointed"
        return failed("the stopped run (expected exit 130)", stopped)
    at = step_of(run_dir)
    again = launch(ctx, run_dir, flags, host)
    if again.returncode != 0 or "resumed from" not in again.output:
        return failed("the resumed run", again)
    largest, bitwise, _ = differences(params(run_dir), params(whole))
    same = losses(run_dir) == losses(whole)
    figures = {"stopped at step": at, "bitwise equal to the reference": bitwise,
               "largest parameter difference": largest, "same epoch losses": same}
    if not (bitwise and same):
        return Outcome(FAIL, f"resumed, but differs from the reference by up to {largest:.3g}"
                             f" (epoch losses {'equal' if same else 'differ'})", figures)
    return Outcome(PASS, f"host memory + augmentation, stopped by SIGTERM at step {at} (exit "
                         f"130), resumed: bitwise equal to the dataset-on-GPU run", figures)


def parity(ctx: Context) -> Outcome:
    """The reference on one worker against two gloo workers on the same GPU (the same global
    batch): the multi-rank CUDA paths (placement, gathers, gloo on CUDA tensors)."""
    whole = reference(ctx)
    run_dir = ctx.out / "runs" / "two-workers"
    flags, overrides = place(ctx, 2)
    result = launch(ctx, run_dir, flags, [*overrides, *exact(ctx), "dist.backend=gloo"])
    if result.returncode != 0:
        return failed("2 workers", result)
    largest, _, close = differences(params(run_dir), params(whole))
    figures = {"largest parameter difference": largest, "tolerance": str(TOLERANCE)}
    return Outcome(PASS if close else FAIL,
                   f"2 gloo workers on one GPU vs 1 worker: parameters differ by up to "
                   f"{largest:.2g} ({'within' if close else 'beyond'} rtol 1e-3, atol 1e-4)",
                   figures)


def compiled(ctx: Context) -> Outcome:
    """perf.compile=on with DDP: trains like the eager reference, saves plain parameter names,
    reports its compile time. (Dry run: TORCH_COMPILE_DISABLE=1, the same code paths without
    Inductor, which takes minutes on a CPU.)"""
    whole = reference(ctx)
    run_dir = ctx.out / "runs" / "compiled"
    flags, overrides = place(ctx)
    env = {"TORCH_COMPILE_DISABLE": "1"} if ctx.dry else None
    result = launch(ctx, run_dir, flags, [*overrides, *exact(ctx), "perf.compile=on"], env)
    if result.returncode != 0:
        return failed("compiled run", result)
    saved, first = params(run_dir), records(run_dir)[0]
    largest, _, close = differences(saved, params(whole))
    figures = {"compile time s": first.get("compile_time_s"),
               "largest parameter difference": largest,
               "images/s, epoch 2 (LeNet)": records(run_dir)[-1]["samples_per_s"]}
    if any("_orig_mod" in k for k in saved) or first.get("compile_time_s") is None:
        return Outcome(FAIL, "checkpoint names carry _orig_mod, or no compile time recorded",
                       figures)
    return Outcome(PASS if close else FAIL,
                   f"compiled in {first['compile_time_s']:.1f} s; parameters within "
                   f"{largest:.2g} of eager ({'within' if close else 'beyond'} rtol 1e-3)",
                   figures)
