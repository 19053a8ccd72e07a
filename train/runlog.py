"""Everything a run leaves on disk, written by the main worker only.

Other ranks get `NullRun`, whose methods do nothing, so the loop never asks "am I rank 0?".
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from train import config as config_mod
from train.config import Config
from train.dist import DistContext
from train.errors import UserError

log = logging.getLogger(__name__)


def setup_logging(rank: int) -> None:
    """Main rank: info to stdout. Other ranks: only warnings and errors, prefixed with the rank."""
    handler = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    fmt = "%(message)s" if rank == 0 else f"[rank {rank}] %(levelname)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def check_run_dir(cfg: Config) -> bool:
    """Refuse a `run.dir` that holds a different run (unless run.overwrite); say if it must be
    cleared first. Changes nothing on disk."""
    folder = Path(cfg.run.dir)
    saved = folder / "config.yaml"
    if saved.is_file():
        old, new = _saved_identity(saved), config_mod.identity(cfg)
        if old == new or (cfg.checkpoint.allow_changes and not cfg.run.overwrite):
            return False  # the same run (continued, with changes when explicitly allowed)
        if not cfg.run.overwrite:
            raise UserError(
                f"{folder} already holds a different run "
                f"({config_mod.describe_differences(old, new)}); "
                f"set run.overwrite=true to replace it, checkpoint.allow_changes=true to "
                f"continue it with this config, or choose another run.dir"
            )
        return True
    if folder.is_dir() and any(folder.iterdir()):
        if not cfg.run.overwrite:
            raise UserError(f"{folder} is not empty and holds no run (no config.yaml); "
                            f"choose another run.dir or set run.overwrite=true")
        return True
    if folder.exists() and not folder.is_dir():
        raise UserError(f"run.dir {folder} exists and is not a folder")
    return False


def _saved_identity(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise UserError(f"{path} is not valid YAML; move the folder away or set "
                        f"run.overwrite=true") from None
    flat = config_mod.flatten(raw)
    return {k: v for k, v in flat.items() if k not in config_mod.NON_IDENTITY_KEYS}


def atomic_write(path: Path, write: Any) -> None:
    """Write through a temp file and rename it over `path`: a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # left over by a crash
    write(tmp)
    os.replace(tmp, path)


class RunFolder:
    """The main worker's view of `run.dir`: config.yaml, metrics.jsonl, summary.json and
    checkpoints/."""

    def __init__(self, folder: Path, replace: bool = False):
        self.folder = folder
        self.replace = replace  # it holds another run, to be cleared when training starts
        self.metrics_path = folder / "metrics.jsonl"
        self.checkpoint_dir = folder / "checkpoints"

    def start(self, cfg: Config, resumed_epochs: int | None = None) -> None:
        """Write the resolved config. A resumed run keeps the metrics of the epochs it does not
        repeat; a run that starts over drops the previous attempt's metrics and checkpoints
        (which a later resume would otherwise take for its own). The run being replaced goes
        only now, once data, model and checkpoint checks have passed."""
        if self.replace:
            shutil.rmtree(self.folder)
            self.replace = False
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.folder / "config.yaml", lambda p: p.write_text(config_mod.to_yaml(cfg)))
        if resumed_epochs is None:
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
            (self.folder / "sample_ledger.jsonl").unlink(missing_ok=True)
        kept = [r for r in self.records() if r["epoch"] <= (resumed_epochs or 0)]
        atomic_write(self.metrics_path,
                     lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in kept)))

    def records(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def log_epoch(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def finish(self, summary: dict[str, Any]) -> None:
        atomic_write(self.folder / "summary.json",
                     lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))



class NullRun(RunFolder):
    """What non-main ranks write: nothing."""

    def __init__(self, folder: Path, replace: bool = False) -> None:
        super().__init__(folder, replace)  # they may read (checkpoints), never write

    def start(self, cfg: Config, resumed_epochs: int | None = None) -> None:
        pass

    def records(self) -> list[dict[str, Any]]:
        return []

    def log_epoch(self, record: dict[str, Any]) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass



def open_run(cfg: Config, ctx: DistContext) -> RunFolder:
    """Check `run.dir` on every rank (all must agree whether an old run is replaced, and so
    not resumed); nothing on disk changes before `start`."""
    replace = check_run_dir(cfg)
    return (RunFolder if ctx.is_main else NullRun)(Path(cfg.run.dir), replace)
