"""Is this the same run? One policy, used for the run folder (launcher, doctor, workers) and for
checkpoints (workers).

A run's identity is its flat config without the keys marked RUNTIME in the schema (how a run is
launched or looked at, `data.root` among them: where the data lies), plus `data.content`, what
the data is (train/run/data_identity.py). Two identities are the same run when no key differs; a
key that one side lacks (a config written before the key existed) counts as holding its
default, so that runs written by an older version still resume, and a `data.content` that one
side lacks (recorded before data fingerprints, or a run folder's config.yaml) is not compared.

The number of workers is not part of it: `train.batch_size` is the global batch, so another
worker count computes the same steps over the same samples, re-sharded, and a run continues on
it (`optim.scale_lr` follows the global batch, not the worker count).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from common.config import flatten, runtime_keys, to_dict
from common.errors import UserError
from common.records import LOCK_FILE, REPLACED_DIR, REPLACING_DIR
from common.schema import Config
from train.run.data_identity import CONTENT_KEY, data_content

_UNSET = "<unset>"
_NOT_A_RUN = (LOCK_FILE, REPLACED_DIR, REPLACING_DIR)  # in a run folder, but no run's files


def identity(cfg: Config) -> dict[str, Any]:
    """The flat keys that define what a run computes (what two runs must share to be one run)."""
    skip = runtime_keys()
    found = {k: v for k, v in flatten(to_dict(cfg)).items() if k not in skip}
    content = data_content(cfg.data)
    if content is not None:
        found[CONTENT_KEY] = content
    return found


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The keys whose values differ, a missing key read as the schema's default. Keys RUNTIME
    now are left out (an older identity may hold them: `data.root`), and so is `data.content`
    where one side lacks it."""
    defaults, skip = identity(Config()), runtime_keys()
    keys = sorted((old.keys() | new.keys()) - skip)
    return [k for k in keys
            if (k != CONTENT_KEY or (k in old and k in new))
            and old.get(k, defaults.get(k, _UNSET)) != new.get(k, defaults.get(k, _UNSET))]


def describe_differences(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> str:
    """'train.epochs: 5 -> 3, optim.lr: 0.1 -> 0.2' for the keys whose values differ."""
    keys = differences(old, new)
    parts = [f"{k}: {old.get(k, _UNSET)!r} -> {new.get(k, _UNSET)!r}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return ", ".join(parts)


def saved_identity(path: Path) -> dict[str, Any]:
    """The identity of the run whose resolved config is `path` (a run folder's config.yaml)."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise UserError(f"{path} is not valid YAML; move the folder away or set "
                        f"run.overwrite=true") from None
    skip = runtime_keys()
    return {k: v for k, v in flatten(raw).items() if k not in skip}


def check_run_dir(cfg: Config) -> bool:
    """Refuse a `run.dir` that holds a different run (unless run.overwrite); return whether an
    old run there is to be replaced. Changes nothing on disk."""
    folder = Path(cfg.run.dir)
    saved = folder / "config.yaml"
    if saved.is_file():
        old, new = saved_identity(saved), identity(cfg)
        if not differences(old, new) or (cfg.checkpoint.allow_changes and not cfg.run.overwrite):
            return False  # the same run (continued, with changes when explicitly allowed)
        if not cfg.run.overwrite:
            raise UserError(
                f"{folder} already holds a different run ({describe_differences(old, new)}); "
                f"set run.overwrite=true to replace it, checkpoint.allow_changes=true to "
                f"continue it with this config, or choose another run.dir"
            )
        return True
    if folder.is_dir() and any(p.name not in _NOT_A_RUN for p in folder.iterdir()):
        if not cfg.run.overwrite:
            raise UserError(f"{folder} is not empty and holds no run (no config.yaml); "
                            f"choose another run.dir or set run.overwrite=true")
        return True
    if folder.exists() and not folder.is_dir():
        raise UserError(f"run.dir {folder} exists and is not a folder")
    return False


# Inside an epoch the position is a count of steps over one shuffled order: with another batch
# size, dataset or seed it no longer says which samples were seen.
_POSITION_KEYS = ("train.batch_size", "seed")


def check_resumable(cfg: Config, state: dict[str, Any], where: str) -> None:
    """Refuse to continue a checkpoint made by another config, unless allowed. Another world
    size continues, re-sharded: the global batch, and with it the learning rate, the steps and
    the samples in each, does not depend on the worker count."""
    old, new = state["config"], identity(cfg)
    changed = differences(old, new)
    if cfg.checkpoint.allow_changes:
        moved = [k for k in changed if k in _POSITION_KEYS or k.startswith("data.")]
        if state["batch_in_epoch"] and moved:
            raise UserError(f"{where} stopped inside an epoch ({state['batch_in_epoch']} steps "
                            f"into it) and {', '.join(moved)} changed, so the samples it already "
                            f"trained on are unknown; keep those keys, or set "
                            f"checkpoint.resume=false to start over")
        return
    if changed:
        raise UserError(f"{where} was written with another config "
                        f"({describe_differences(old, new)}); set "
                        f"checkpoint.allow_changes=true to continue with this one, or "
                        f"checkpoint.resume=false to start over")
