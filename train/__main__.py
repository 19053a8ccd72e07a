"""`python -m train CONFIG [key=value ...]`: one worker; torchrun starts one per device.

config -> distributed setup -> run folder -> data -> model and strategy -> resume -> fit.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from models import build_model
from train import dist
from train.config import (
    Config,
    check_device_options,
    check_world_size,
    load_config,
    use_channels_last,
)
from train.data import TensorData, eval_batches, load_datasets, place, train_batches
from train.dist import DistContext, agree
from train.errors import EXIT_INTERRUPTED, UserError
from train.loop import Interrupted, Trainer, check_resumable
from train.monitor import Console, Monitor
from train.runlog import RunFolder, open_run, setup_logging
from train.strategies import Single, dp_note, make_strategy
from train.tracking import WandbSink, resolve_mode

log = logging.getLogger("train")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    setup_logging(int(os.environ.get("RANK", "0")))
    ctx = None
    try:
        cfg = load_config(args.config, args.overrides)
        ctx = dist.setup(cfg.dist)
        train(cfg, ctx)
        return 0
    except Interrupted as exc:
        log.info("interrupted (signal %d): stopped after step %d and wrote a checkpoint; "
                    "run the same command to resume", exc.signum, exc.step)
        return EXIT_INTERRUPTED
    except UserError as exc:
        report(exc, ctx)
        if exc.agreed:
            # Exit after the reporting rank has printed: torchrun stops everyone at the
            # first exit, and the message would be lost.
            torch.distributed.barrier()
        return exc.exit_code
    finally:
        dist.teardown(ctx)


def report(exc: UserError, ctx: DistContext | None) -> None:
    """Errors every rank shares (config before setup, agreed ones) come from local rank 0 of
    each node; an error of one rank alone comes from that rank, which it names."""
    shared = ctx is None or exc.agreed or not ctx.distributed
    if not shared:
        print(f"error: [rank {ctx.rank}] {exc}", file=sys.stderr, flush=True)
    elif int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"error: {exc}", file=sys.stderr, flush=True)


def train(cfg: Config, ctx: DistContext) -> None:
    """Everything between joining and leaving the process group."""
    # The same checks on every rank: agreed, so that one process reports them.
    agree(ctx, lambda: check_world_size(cfg, ctx.world_size))
    for warning in agree(ctx, lambda: check_device_options(cfg, ctx.device.type)):
        if ctx.is_main:
            log.warning("%s", warning)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.perf.cudnn_benchmark
    strategy = make_strategy(cfg, ctx)
    run = agree(ctx, lambda: open_run(cfg, ctx))
    trainer = build_trainer(cfg, ctx, strategy, run)
    resumed = agree(ctx, lambda: resume(cfg, ctx, trainer, run))
    check_same_start(ctx, resumed, cfg.run.dir)
    run.start(cfg, resumed_epochs=trainer.state.epoch if resumed else None)
    log.info(describe(cfg, ctx, trainer))
    if resumed and trainer.state.step >= trainer.total_steps:
        log.info("%s is complete (step %d of %d, from %s): nothing left to train; "
                 "checkpoint.resume=false trains it again", cfg.run.dir, trainer.state.step,
                 trainer.total_steps, resumed)
    elif resumed:
        log.info("resumed from %s: epoch %d, step %d", resumed, trainer.state.epoch + 1,
                 trainer.state.step)
    if ctx.is_main and resolve_mode(cfg.wandb)[0] != "disabled":
        sink = WandbSink(cfg, ctx, strategy.name, run.folder, trainer.wandb_run_id)
        trainer.wandb_run_id = sink.id
        trainer.monitor.sinks.append(sink)
    try:
        trainer.fit()
    finally:
        trainer.monitor.close()
    log.info("run folder: %s", cfg.run.dir)


def build_trainer(cfg: Config, ctx: DistContext, strategy: Single, run: RunFolder) -> Trainer:
    """Data, model and loop for this worker (the same on every path)."""
    train_set, test_set = load_data(cfg, ctx)
    nhwc = use_channels_last(cfg, ctx.device.type)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg.model.name, train_set.channels, train_set.num_classes,
                        train_set.image_size, init=cfg.model.init)
    return Trainer(
        cfg, ctx, strategy, model,
        train_batches(train_set, ctx.rank, ctx.world_size, cfg.train.batch_size, cfg.seed,
                      ctx.device, channels_last=nhwc),
        eval_batches(test_set, ctx.rank, ctx.world_size, cfg.train.eval_batch_size, ctx.device,
                     pad=cfg.debug.pad_eval, channels_last=nhwc),
        run,
        Monitor([Console(cfg.log, cfg.train.epochs)] if ctx.is_main else []),
    )


def resume(cfg: Config, ctx: DistContext, trainer: Trainer, run: RunFolder) -> Path | None:
    """Load the newest valid checkpoint of `run.dir` into `trainer`, if resuming is on."""
    if not cfg.checkpoint.resume or run.replace:  # a run being replaced is not continued
        return None
    found = trainer.checkpoints.load_latest(ctx.device)
    if found is None:
        return None
    path, state = found
    check_resumable(cfg, ctx.world_size, state, f"checkpoint {path}")
    trainer.restore(state)
    return path


def check_same_start(ctx: DistContext, resumed: Path | None, run_dir: str) -> None:
    """Every rank must continue from the same checkpoint: a node that cannot see run.dir (no
    shared file system) would start from step 0 while the others resume, and hang later."""
    if not ctx.distributed:
        return
    names: list[str | None] = [None] * ctx.world_size
    torch.distributed.all_gather_object(names, resumed.name if resumed else None)
    for rank, name in enumerate(names):
        if name != names[0]:
            raise UserError(f"rank 0 resumes from {names[0] or 'nothing'} but rank {rank} from "
                            f"{name or 'nothing'} in {run_dir}: run.dir must be a folder every "
                            f"node sees alike (a shared file system)", agreed=True)


def load_data(cfg: Config, ctx: DistContext) -> tuple[TensorData, TensorData]:
    """One process per node downloads what is missing; then every rank reads the files."""
    data = agree(ctx, lambda: load_datasets(cfg, download=True) if ctx.local_rank == 0 else None)
    train_set, test_set = agree(ctx, lambda: data or load_datasets(cfg, download=False))
    return (place(train_set, ctx.device, cfg.data.on_device),
            place(test_set, ctx.device, cfg.data.on_device))


def describe(cfg: Config, ctx: DistContext, trainer: Trainer) -> str:
    path = trainer.strategy.name
    train_set, test_set = trainer.train_data.data, trainer.test_data.data
    params = sum(p.numel() for p in trainer.plain.parameters())
    where = f"{ctx.world_size} x {ctx.device.type} ({ctx.backend})"
    if path == "dp":
        where = dp_note()
    elif path == "single":
        where = f"one process on {ctx.device.type}"
    if ctx.device.type == "cpu":
        where += f", {ctx.cpu_threads} thread(s) each"
    if path == "scratch":
        bucket = "per parameter" if cfg.scratch.per_parameter else f"{cfg.scratch.bucket_mb} MiB"
        where += f"; our {cfg.scratch.algorithm} allreduce, buckets {bucket}"
    knobs = [cfg.perf.precision] + (["channels_last"] if trainer.channels_last else [])
    knobs += ["torch.compile"] if trainer.compiled else []
    if cfg.train.grad_accum_steps > 1:
        knobs.append(f"{cfg.train.grad_accum_steps} micro-batches")
    where += f"; {', '.join(knobs)}"
    shape = f"{train_set.channels}x{train_set.image_size}x{train_set.image_size}"
    return (
        f"{path}: {where}\n"
        f"model {cfg.model.name} ({params:,} parameters); data {cfg.data.name} {shape}: "
        f"{len(train_set):,} train / {len(test_set):,} test\n"
        f"global batch {cfg.train.batch_size} "
        f"({cfg.train.batch_size // ctx.world_size} per worker), "
        f"{trainer.steps_per_epoch} steps/epoch, {cfg.train.epochs} epochs"
        + (f", at most {cfg.train.max_steps} steps" if cfg.train.max_steps else "")
    )


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train",
                                     description="One training worker (start it with torchrun "
                                                 "or `python -m launch`).")
    parser.add_argument("config", help="YAML config file, e.g. configs/default.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.epochs=3 optim.lr=0.1")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
