"""A config as the tools and tests load it: the engine's `load_config` (common/config.py), then
the names checked (common/validate.py: `check_names`, which needs no world). The launcher and
the workers load with the engine and call `validate(cfg, world)`, which checks the names once
among the rest."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from common import config as engine
from common.schema import Config
from common.validate import check_names


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read, override and check a config's names (model, optimizer, dataset)."""
    cfg = engine.load_config(path, overrides)
    check_names(cfg)
    return cfg
