"""`python -m train CONFIG [key=value ...]`: one worker; torchrun starts one per device.

config -> distributed setup -> run folder -> data -> model and strategy -> fit -> teardown.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from models import build_model
from train import dist
from train.config import Config, check_world_size, load_config
from train.data import TensorData, eval_batches, load_datasets, place, train_batches
from train.dist import DistContext, agree
from train.errors import EXIT_USER_ERROR, UserError
from train.loop import Trainer
from train.runlog import open_run, setup_logging
from train.strategies import make_strategy

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
    except UserError as exc:
        # Config errors are the same on every rank: one line per node is enough.
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        if exc.agreed:
            # Exit after the reporting rank has printed: torchrun stops everyone at the
            # first exit, and the message would be lost.
            torch.distributed.barrier()
        return EXIT_USER_ERROR
    finally:
        dist.teardown(ctx)


def train(cfg: Config, ctx: DistContext) -> None:
    """Everything between joining and leaving the process group."""
    check_world_size(cfg, ctx.world_size)
    run = agree(ctx, lambda: open_run(cfg, ctx))
    run.start(cfg)
    train_set, test_set = load_data(cfg, ctx)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg.model.name, train_set.channels, train_set.num_classes,
                        train_set.image_size)
    trainer = Trainer(
        cfg, ctx, make_strategy(cfg.mode, ctx), model,
        train_batches(train_set, ctx.rank, ctx.world_size, cfg.train.batch_size, cfg.seed,
                      ctx.device),
        eval_batches(test_set, ctx.rank, ctx.world_size, cfg.train.eval_batch_size, ctx.device),
        run,
    )
    log.info(describe(cfg, ctx, model, train_set, test_set, len(trainer.train_data)))
    trainer.fit()
    log.info("run folder: %s", cfg.run.dir)


def load_data(cfg: Config, ctx: DistContext) -> tuple[TensorData, TensorData]:
    """One process per node downloads what is missing; then every rank reads the files."""
    data = agree(ctx, lambda: load_datasets(cfg, download=True) if ctx.local_rank == 0 else None)
    train_set, test_set = agree(ctx, lambda: data or load_datasets(cfg, download=False))
    return place(train_set, ctx.device, cfg.data.on_device), place(test_set, ctx.device,
                                                                  cfg.data.on_device)


def describe(cfg: Config, ctx: DistContext, model: torch.nn.Module, train_set: TensorData,
             test_set: TensorData, steps_per_epoch: int) -> str:
    params = sum(p.numel() for p in model.parameters())
    where = f"{ctx.world_size} x {ctx.device.type} ({ctx.backend})"
    if ctx.device.type == "cpu":
        where += f", {ctx.cpu_threads} thread(s) each"
    shape = f"{train_set.channels}x{train_set.image_size}x{train_set.image_size}"
    return (
        f"{cfg.mode}: {where}\n"
        f"model {cfg.model.name} ({params:,} parameters); data {cfg.data.name} {shape}: "
        f"{len(train_set):,} train / {len(test_set):,} test\n"
        f"global batch {cfg.train.batch_size} "
        f"({cfg.train.batch_size // ctx.world_size} per worker), "
        f"{steps_per_epoch} steps/epoch, {cfg.train.epochs} epochs"
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
