"""A finished (or running) run, opened again: its config, its data and its model with a
checkpoint's weights, for evaluation and export (train/after/evaluate.py, train/after/export.py)."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import UserError, outside
from common.records import CHECKPOINT_DIR, VAL_SPLIT_FILE
from common.schema import Config
from train.config import load_config
from train.data.build import DataParts, build_data
from train.dist import DistContext
from train.model import build_plain_model, misfit, use_channels_last
from train.optim import AUTOCAST_DTYPES
from train.run.checkpoint import CorruptCheckpoint, load
from train.run.location import follow_latest
from train.run.sharded import load_model_state_dict


@dataclass
class Trained:
    model: nn.Module  # on the worker's device, in eval mode
    data: DataParts
    step: int  # the checkpoint's optimizer step
    autocast: Callable[[], contextlib.AbstractContextManager]  # the run's precision


def run_config(run: Path, overrides: list[str]) -> Config:
    """The run's resolved config (config.yaml), with `overrides`."""
    path = run / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run} holds no run (no config.yaml)")
    return load_config(path, overrides)


def checkpoint_path(run: Path, given: str | None) -> Path:
    """`--checkpoint`: `last` (the default), `best` (checkpoint.keep_best's), or a file."""
    if given in (None, "", "last", "best"):
        name = "best" if given == "best" else "last"
        path = run / CHECKPOINT_DIR / f"{name}.pt"
        if name == "best" and not path.is_file():
            raise UserError(f"{run} has no best checkpoint ({path}): it is kept by runs with "
                            f"checkpoint.keep_best set, from their first evaluation on")
        return path
    return Path(given)


def read_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"no checkpoint {path}")
    try:
        with outside(f"reading checkpoint {path}", passing=(CorruptCheckpoint,)):
            return load(path)
    except CorruptCheckpoint as exc:
        raise UserError(f"checkpoint {path} cannot be read: {exc}") from None


def check_inputs(run: Path, checkpoint: Path, overrides: list[str]) -> None:
    """What the command can tell before starting workers: the run, the overrides, the file."""
    run_config(run, overrides)
    read_checkpoint(checkpoint)


def checkpoint_record(run: Path, checkpoint: Path, step: int) -> dict[str, Any]:
    """What eval.json and meta.json say they used: the run folder and checkpoint file resolved
    (`runs/latest` and `last.pt` move on with the next run or step), its step and sha256."""
    digest = hashlib.sha256()
    with checkpoint.open("rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    path = checkpoint.resolve()
    named = path.with_name(f"step_{step:08d}.pt")  # last.pt is a hard link to the step's file
    if path.name in ("last.pt", "best.pt") and named.is_file() and named.samefile(path):
        path = named
    return {"run": str(follow_latest(run).resolve()), "checkpoint": str(path), "step": step,
            "checkpoint_sha256": digest.hexdigest()}


def weights(state: dict[str, Any], ema: bool, path: Path) -> dict[str, torch.Tensor]:
    """The model's plain state_dict from `state` (read from `path`), or its moving average."""
    if not ema:
        if "model" not in state:  # mode fsdp's step files: the model is in their DCP folder

            return load_model_state_dict(path)
        return state["model"]
    if "ema" not in state:
        raise UserError(f"checkpoint {path} holds no moving average (train.ema_decay was off)")
    return state["ema"]["module"]


def open_trained(cfg: Config, ctx: DistContext, checkpoint: Path, ema: bool,
                 run: Path | None = None) -> Trained:
    """The run's data (test batches as training had them: the run folder's val_split.json,
    with data.val_fraction) and model with the checkpoint's weights; the run's own initial
    weights are not needed (no init_from, no download)."""
    cfg = replace(cfg, model=replace(cfg.model, init_from="", pretrained=False))
    state = read_checkpoint(checkpoint)
    nhwc = use_channels_last(cfg.perf, ctx.device.type)
    split = follow_latest(run) / VAL_SPLIT_FILE if run is not None else None
    data = build_data(cfg.data, cfg.seed, ctx, cfg.train.batch_size, cfg.train.eval_batch_size,
                      nhwc, recorded_split=split)
    if list(state["classes"]["names"]) != data.facts.classes:
        raise UserError(f"checkpoint {checkpoint} was trained on other classes than the data "
                        f"now has ({len(state['classes']['names'])} vs "
                        f"{data.facts.num_classes})")
    model = build_plain_model(cfg, ctx, data.facts, nhwc)
    fit_weights(model, weights(state, ema, checkpoint), checkpoint, state, cfg.model.name)
    dtype = AUTOCAST_DTYPES.get(cfg.perf.precision)
    if dtype is not None and ctx.device.type == "cpu" and dtype == torch.float16:
        dtype = None  # fp16 autocast is a GPU feature; the CPU evaluates in fp32

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(ctx.device.type, dtype=dtype, enabled=dtype is not None)

    return Trained(model.eval(), data, int(state["step"]), autocast)


def fit_weights(model: nn.Module, found: dict[str, torch.Tensor], checkpoint: Path,
                state: dict[str, Any], name: str) -> None:
    """The checkpoint's weights into `model`; a checkpoint of another model (another run's,
    given to `make eval`/`make export`) is one line naming both models."""
    problem = misfit(found, model)
    if problem:
        written = state.get("config", {}).get("model.name", "an unknown model")
        raise UserError(f"checkpoint {checkpoint} was written for model {written} and does not "
                        f"fit model {name}, which the run's config builds: keys {problem}; give "
                        f"a checkpoint of this run (--checkpoint) or the run folder it belongs to")
    model.load_state_dict(found)


def normalization(data: DataParts) -> dict[str, list[float]] | None:
    """The per-channel mean and std the model's inputs were normalized with (0..255 units)."""
    test = data.test
    stats = getattr(getattr(test, "finish", None), "stats", None)  # the stream path
    if stats is None and getattr(test.data, "mean", None) is not None:
        stats = (test.data.mean, test.data.std)
    if stats is None:
        return None
    return {"mean": stats[0].flatten().tolist(), "std": stats[1].flatten().tolist(),
            "units": "0..255 pixel values: x = (pixels - mean) / std"}
