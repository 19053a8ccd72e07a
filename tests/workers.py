"""Functions that tests run inside real worker processes (they must be importable by name)."""

from __future__ import annotations

from pathlib import Path

import torch

from train import dist
from train.config import load_config
from train.worker import train

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"


def train_and_return_params(overrides: list[str]) -> dict[str, torch.Tensor]:
    """Train through the production entry point; return the main worker's saved parameters."""
    return train_and_return_state(overrides).get("model", {})


def _trainer(cfg, ctx):
    from train.run_folder import NullRun
    from train.strategies import make_strategy
    from train.worker import build_trainer

    return build_trainer(cfg, ctx, make_strategy(cfg, ctx), NullRun(Path(cfg.run.dir)))


def evaluate_fresh_model(overrides: list[str]) -> dict[str, float]:
    """Build the run exactly as `train` does, then only evaluate (no training step)."""
    cfg = load_config(DEFAULT_CONFIG, overrides)
    ctx = dist.setup(cfg.dist)
    try:
        trainer = _trainer(cfg, ctx)
        torch.manual_seed(1)
        for p in trainer.plain.parameters():  # larger weights than the init: varied predictions
            p.data.normal_(0, 0.1)
        return trainer.evaluate()
    finally:
        dist.teardown(ctx)


def agree_on_failure(failing_rank: int) -> str:
    """One rank fails a setup step; every rank must see the error (none waits forever)."""
    from common.errors import UserError
    from common.schema import DistConfig

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


def ddp_settings(overrides: list[str]) -> dict:
    """Build the trainer as `train` does and report what DDP did with its knobs."""
    cfg = load_config(DEFAULT_CONFIG, overrides)
    ctx = dist.setup(cfg.dist)
    try:
        trainer = _trainer(cfg, ctx)
        batches = trainer.train_data.iterate()
        for _ in range(3):  # DDP rebuilds its buckets after the first iteration
            trainer.train_step(*next(batches))
        data = trainer.model._get_ddp_logging_data()
        sizes = data.get("rebuilt_bucket_sizes") or data["bucket_sizes"]
        return {"bucket_sizes": [int(x) for x in str(sizes).split(",")],
                "static_graph": trainer.model.static_graph,
                "grads_are_bucket_views": [p.grad._base is not None
                                           for p in trainer.plain.parameters()]}
    finally:
        dist.teardown(ctx)



def train_and_return_state(overrides: list[str]) -> dict:
    """Train through the production entry point; return the main worker's last checkpoint
    without its per-rank parts (model, optimizer, scheduler, EMA, position)."""
    cfg = load_config(DEFAULT_CONFIG, overrides)
    ctx = dist.setup(cfg.dist)
    try:
        train(cfg, ctx)
    finally:
        dist.teardown(ctx)
    if not ctx.is_main:
        return {}
    state = torch.load(Path(cfg.run.dir) / "checkpoints" / "last.pt", weights_only=True)
    return {k: v for k, v in state.items() if k not in ("ranks", "config")}
