"""Functions that tests run inside real worker processes (they must be importable by name)."""

from __future__ import annotations

from pathlib import Path

import torch

from train import dist
from train.__main__ import train
from train.config import load_config

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"


def train_and_return_params(overrides: list[str]) -> dict[str, torch.Tensor]:
    """Train through the production entry point; return the main worker's saved parameters."""
    cfg = load_config(DEFAULT_CONFIG, overrides)
    ctx = dist.setup(cfg.dist)
    try:
        train(cfg, ctx)
    finally:
        dist.teardown(ctx)
    if not ctx.is_main:
        return {}
    state = torch.load(Path(cfg.run.dir) / "checkpoints" / "last.pt", weights_only=True)
    return state["model"]


def evaluate_fresh_model(overrides: list[str]) -> dict[str, float]:
    """Build the run exactly as `train` does, then only evaluate (no training step)."""
    from models import build_model
    from train.__main__ import load_data
    from train.data import eval_batches, train_batches
    from train.loop import Trainer
    from train.monitor import Monitor
    from train.runlog import NullRun
    from train.strategies import make_strategy

    cfg = load_config(DEFAULT_CONFIG, overrides)
    ctx = dist.setup(cfg.dist)
    try:
        train_set, test_set = load_data(cfg, ctx)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model.name, train_set.channels, train_set.num_classes,
                            train_set.image_size)
        for p in model.parameters():  # larger weights than the init: varied predictions
            p.data.normal_(0, 0.1)
        trainer = Trainer(cfg, ctx, make_strategy(cfg, ctx), model,
                          train_batches(train_set, ctx.rank, ctx.world_size,
                                        cfg.train.batch_size, cfg.seed, ctx.device),
                          eval_batches(test_set, ctx.rank, ctx.world_size,
                                       cfg.train.eval_batch_size, ctx.device),
                          NullRun(Path(cfg.run.dir)), Monitor([]))
        return trainer.evaluate()
    finally:
        dist.teardown(ctx)


def agree_on_failure(failing_rank: int) -> str:
    """One rank fails a setup step; every rank must see the error (none waits forever)."""
    from train.config import DistConfig
    from train.errors import UserError

    ctx = dist.setup(DistConfig(device="cpu"))
    try:
        def step():
            if ctx.rank == failing_rank:
                raise UserError("disk full")
            return "fine"

        try:
            dist.agree(ctx, step)
        except UserError as exc:
            return f"{exc}|agreed={exc.agreed}"
        return "no error"
    finally:
        dist.teardown(ctx)
