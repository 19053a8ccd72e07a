"""Everything a run leaves on disk besides checkpoints, written by the main worker only.

Other ranks get `NullRun`, whose methods write nothing, so the loop never asks "am I rank 0?".
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from common.config import to_yaml
from common.errors import UserError
from common.files import atomic_write, why_not_writable
from common.records import (
    CHECKPOINT_DIR,
    CLASSES_FILE,
    CONFIG_FILE,
    LEDGER_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
)
from common.schema import Config
from train.dist import DistContext
from train.identity import check_run_dir

log = logging.getLogger(__name__)


class RunFolder:
    """The main worker's view of `run.dir`: config.yaml, metrics.jsonl, summary.json (and the
    checkpoints/ folder, which train/checkpoint.py writes)."""

    def __init__(self, folder: Path, replace: bool = False):
        self.folder = folder
        self.replace = replace  # it holds another run, to be cleared when training starts
        self.metrics_path = folder / METRICS_FILE
        self.checkpoint_dir = folder / CHECKPOINT_DIR
        self.records: list[dict[str, Any]] = []  # every epoch of the run, resumed ones too

    def start(self, cfg: Config, resumed_epochs: int | None = None) -> None:
        """Write the resolved config. A resumed run keeps the metrics of the epochs it does not
        repeat; a run that starts over drops the previous attempt's metrics and checkpoints
        (which a later resume would otherwise take for its own). The run being replaced goes
        only now, once data, model and checkpoint checks have passed."""
        if self.replace:
            shutil.rmtree(self.folder)
            self.replace = False
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.folder / CONFIG_FILE, lambda p: p.write_text(to_yaml(cfg)))
        if resumed_epochs is None:
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
            (self.folder / LEDGER_FILE).unlink(missing_ok=True)
        self.records = [r for r in self._read_records() if r["epoch"] <= (resumed_epochs or 0)]
        atomic_write(self.metrics_path,
                     lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in self.records)))

    def save_classes(self, names: list[str]) -> None:
        """classes.json: class index -> name, as the model's outputs are numbered."""
        atomic_write(self.folder / CLASSES_FILE, lambda p: p.write_text(json.dumps(names) + "\n"))

    def _read_records(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def log_epoch(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def finish(self, summary: dict[str, Any]) -> None:
        atomic_write(self.folder / SUMMARY_FILE,
                     lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))


class NullRun(RunFolder):
    """What non-main ranks write: nothing (they may read checkpoints, never write)."""

    def start(self, cfg: Config, resumed_epochs: int | None = None) -> None:
        pass

    def save_classes(self, names: list[str]) -> None:
        pass

    def log_epoch(self, record: dict[str, Any]) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass


def open_run(cfg: Config, ctx: DistContext) -> RunFolder:
    """Check `run.dir` on every rank (all must agree whether an old run is replaced, and so
    not resumed); nothing on disk changes before `start`."""
    replace = check_run_dir(cfg)
    why = why_not_writable(Path(cfg.run.dir)) if ctx.is_main else None  # only it writes there
    if why:
        raise UserError(f"run.dir {cfg.run.dir} cannot be created or written: {why}")
    return (RunFolder if ctx.is_main else NullRun)(Path(cfg.run.dir), replace)
