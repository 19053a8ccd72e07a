"""The parts of `make gpu-check` that run the sharded modes and the stream loader on the GPU."""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path
from typing import Any

from tools.gpu_check import FAIL, PASS, REPO, Context, Outcome, environment
from tools.gpu_check.group import run_group
from tools.gpu_check.parts import describe, failed, launch, place, records, step_figures


def small(ctx: Context) -> list[str]:
    train, test, batch, steps = (64, 16, 16, 4) if ctx.dry else (1536, 301, 128, 8)
    return [f"data.synthetic.train_samples={train}", f"data.synthetic.test_samples={test}",
            f"train.batch_size={batch}", f"train.max_steps={steps}", "log.every_steps=4",
            "optim.clip_grad_norm=1.0"]


def sharded(ctx: Context) -> Outcome:
    """fsdp with bf16 autocast and zero with fp16 (the GradScaler; dry run: bf16, the CPU has
    no fp16 autocast), both clipping, on one GPU: they train, checkpoint and finish."""
    flags, overrides = place(ctx)
    runs = {"fsdp": "bf16", "zero": "bf16" if ctx.dry else "fp16"}
    how = {"fsdp": (["--mode", "fsdp"], []), "zero": (["--mode", "ddp"], ["ddp.zero=true"])}
    figures: dict[str, Any] = {}
    for mode, precision in runs.items():
        run_dir = ctx.out / "runs" / mode
        result = launch(ctx, run_dir, [*how[mode][0], *flags],
                        [*overrides, *how[mode][1], *small(ctx), f"perf.precision={precision}"])
        if result.returncode != 0:
            return failed(f"mode {mode}, {precision}", result)
        last = records(run_dir)[-1]
        if not math.isfinite(last["train_loss"]):
            return Outcome(FAIL, f"mode {mode}: loss {last['train_loss']}", figures)
        if not any((run_dir / "checkpoints").glob("*")):  # DCP's save steps the optimizer
            return Outcome(FAIL, f"mode {mode}: finished without a checkpoint", figures)
        figures[f"{mode} {precision}"] = describe(step_figures(last))
        if precision == "fp16" and (scaler := _scaler(run_dir)) is not None:
            figures["zero fp16 loss scale"] = scaler.get("scale")
            if not scaler.get("_growth_tracker"):  # the scaler never stepped: no AMP at all
                return Outcome(FAIL, f"mode zero fp16: the GradScaler did not step ({scaler})",
                               figures)
    return Outcome(PASS, "a few steps each, clipped, checkpointed: " + "; ".join(
        f"{mode} {precision} {figures[f'{mode} {precision}']}"
        for mode, precision in runs.items()), figures)


def _scaler(run_dir: Path) -> dict[str, Any] | None:
    import torch

    path = run_dir / "checkpoints" / "last.pt"
    if not path.is_file():  # a sharded checkpoint keeps it elsewhere: nothing to read here
        return None
    return torch.load(path, map_location="cpu", weights_only=True).get("scaler")


def image_folder(root: Path, dry: bool) -> Path:
    """256 train / 64 val JPEGs (dry run: 64 / 16), 64 to 160 px, one of them CMYK (ImageNet
    has a few dozen)."""
    from PIL import Image

    from tools.make_images import write_image_folder

    write_image_folder(root, *((64, 16) if dry else (256, 64)), classes=4, min_size=64,
                       max_size=160)
    cmyk = sorted((root / "train").rglob("*.jpg"))[5]
    buffer = io.BytesIO()
    Image.open(cmyk).convert("CMYK").save(buffer, "JPEG", quality=90)
    cmyk.write_bytes(buffer.getvalue())
    return root


def stream_nvjpeg(ctx: Context) -> Outcome:
    """An image folder on the stream path with pinned batches, decoded by nvjpeg (dry run:
    PIL), imagenet's recipe at 64 px; then the nvjpeg test (host indices, no host sync while
    rendering, a refused file decoded alone on the CPU)."""
    root = image_folder(ctx.out / "data" / "images", ctx.dry)
    run_dir = ctx.out / "runs" / "stream"
    flags, overrides = place(ctx)
    device_data = (["data.decoder=pil", "data.num_workers=1"] if ctx.dry else
                   ["data.decoder=nvjpeg", "data.pin_memory=true", "data.num_workers=4"])
    result = launch(ctx, run_dir, flags, [
        *overrides, *device_data, "data.name=imagefolder", f"data.root={root}",
        "data.loader=stream", "data.image_size=64", "data.augment=imagenet",
        f"train.batch_size={16 if ctx.dry else 64}", "train.epochs=2", "log.every_steps=2"])
    if result.returncode != 0:
        return failed("stream loader", result)
    last = records(run_dir)[-1]
    figures = {"decoder": "pil (dry run)" if ctx.dry else "nvjpeg", **step_figures(last),
               "skipped files": last.get("skipped_files", 0)}
    test = "refused_file_goes_to_the_cpu" if ctx.dry else "nvjpeg_keeps_indices"
    print(f"$ pytest tests/test_gpu_data.py -k {test}", flush=True)
    tests = run_group([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                       "tests/test_gpu_data.py", "-k", test, "-m", "not gpu" if ctx.dry else
                       "gpu", f"--basetemp={ctx.out / 'pytest'}"], ctx.left_s() - 2, cwd=REPO,
                      env=environment())
    figures["nvjpeg test"] = tests.last_lines(1)
    if tests.returncode != 0 or " passed" not in tests.output or "skipped" in tests.output:
        return failed("the nvjpeg test", tests)
    return Outcome(PASS, f"{figures['decoder']}, 64 px, epoch 2: {describe(figures)}; "
                         f"{test}: passed", figures)
