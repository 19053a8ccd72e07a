"""The worker library's view of a config: the shared schema and engine (common/config.py), plus
the checks of names that only the library knows (models, datasets)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from common import config as engine
from common.errors import UserError
from common.schema import Config


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read, override and check a config: what the launcher, the doctor and workers all load."""
    cfg = engine.load_config(path, overrides)
    check_names(cfg)
    return cfg


def check_names(cfg: Config) -> None:
    """Names that must exist: the model, the optimizer and the dataset (close matches named)."""
    from models import check_name  # late: models imports torch
    from train.data import DATASETS
    from train.optim import check_optimizer_name

    check_name(cfg.model.name)
    check_optimizer_name(cfg.optim.name)
    _choice("data.name", cfg.data.name, DATASETS)


def _choice(key: str, value: str, known: Iterable[str]) -> None:
    if value not in known:
        raise UserError(f"config: {key} {value!r} is unknown; "
                        f"choose one of {', '.join(sorted(known))}")
