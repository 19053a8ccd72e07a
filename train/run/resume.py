"""Continuing a run: find the newest valid checkpoint, check that every rank found the same one
and that it belongs to this run (train/run/identity.py decides), and hand it to the checkpointer."""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

from common.errors import UserError
from common.host import ELASTIC_ENV
from common.schema import Config, TrainConfig
from train.dist import DistContext
from train.run.checkpoint import Checkpointer
from train.run.folder import RunFolder
from train.run.identity import check_resumable


def resume(cfg: Config, ctx: DistContext, checkpointer: Checkpointer,
           run: RunFolder) -> Path | None:
    """Load the newest valid checkpoint of `run.dir` into the run's parts, if resuming is on;
    return its path."""
    found = None
    if cfg.checkpoint.resume and not run.replace:  # a run being replaced is not continued
        found = checkpointer.files.load_latest()
    # Before any part loads: sharded parts load collectively, with every rank in the same one.
    check_same_start(ctx, found[0] if found else None, cfg.run.dir)
    if found is None:
        return None
    path, state = found
    check_resumable(cfg, state, f"checkpoint {path}")
    checkpointer.restore(state)
    return path


def elastic_nodes() -> str | None:
    """"MIN:MAX" when the launcher started this worker in an elastic job (`--nnodes MIN:MAX`);
    with torchrun directly, set DPTRAIN_ELASTIC yourself (or checkpoint.allow_changes=true)."""
    return os.environ.get(ELASTIC_ENV) or None
def is_complete(cfg: TrainConfig, epochs_done: int, steps_done: int) -> bool:
    """Nothing left to train at this position: every epoch done, or train.max_steps reached
    (Trainer.finished, for those who do not know the steps per epoch: launcher, doctor)."""
    return epochs_done >= cfg.epochs or (cfg.max_steps is not None and steps_done >= cfg.max_steps)


def check_same_start(ctx: DistContext, resumed: Path | None, run_dir: str) -> None:
    """Every rank must continue from the same checkpoint: a node that cannot see run.dir (no
    shared file system) would start from step 0 while the others resume, and hang later."""
    if not ctx.distributed:
        return
    names: list[str | None] = [None] * ctx.world_size
    dist.all_gather_object(names, resumed.name if resumed else None)
    for rank, name in enumerate(names):
        if name != names[0]:
            raise UserError(f"rank 0 resumes from {names[0] or 'nothing'} but rank {rank} from "
                            f"{name or 'nothing'} in {run_dir}: run.dir must be a folder every "
                            f"node sees alike (a shared file system)", agreed=True)
