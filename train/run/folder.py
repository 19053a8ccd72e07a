"""Everything a run leaves on disk besides checkpoints, written by the main worker only.

Other ranks get `NullRun`, whose methods write nothing, so the loop never asks "am I rank 0?".
The main worker holds the folder's lock (common/lock.py) from `open_run` to the job's end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.config import to_yaml
from common.errors import UserError
from common.files import atomic_write, fsync_folder, why_not_writable, write_failure
from common.lock import RunLock
from common.records import (
    CHECKPOINT_DIR,
    CLASSES_FILE,
    CONFIG_FILE,
    LEDGER_FILE,
    LOCK_FILE,
    METRICS_FILE,
    REPLACED_DIR,
    REPLACING_DIR,
    SUMMARY_FILE,
    VAL_SPLIT_FILE,
)
from common.schema import Config
from train.data.imagefolder import FileSet
from train.data.val_split import write_split
from train.dist import DistContext, from_main
from train.run.checkpoint import Checkpoints
from train.run.identity import check_run_dir
from train.run.location import point_latest

log = logging.getLogger(__name__)
# What a run that starts over in its own folder (checkpoint.resume=false) sets aside.
ATTEMPT_FILES = (CHECKPOINT_DIR, METRICS_FILE, SUMMARY_FILE, LEDGER_FILE)


class RunFolder:
    """The main worker's view of `run.dir`: config.yaml, metrics.jsonl, summary.json (and the
    checkpoints/ folder, which train/run/checkpoint.py writes)."""

    def __init__(self, folder: Path, replace: bool = False):
        self.folder = folder
        self.replace = replace  # it holds another run, to be set aside when training starts
        self.metrics_path = folder / METRICS_FILE
        self.checkpoint_dir = folder / CHECKPOINT_DIR
        self.records: list[dict[str, Any]] = []  # every epoch of the run, resumed ones too
        self.held_out: FileSet | None = None  # data.val_fraction's split, recorded at start

    def start(self, cfg: Config, resumed_epochs: int | None = None) -> None:
        """Write the resolved config. A resumed run keeps the metrics of the epochs it does not
        repeat. A run that replaces another, or starts over, first moves the old files into
        `replaced/` (a later resume would otherwise take them for its own); they are deleted
        once this run has written its first checkpoint, so nothing is lost if it fails first."""
        if self.replace:
            self._set_aside([p.name for p in self.folder.iterdir()
                             if p.name not in (LOCK_FILE, REPLACED_DIR, REPLACING_DIR)])
        elif resumed_epochs is None:
            self._set_aside(list(ATTEMPT_FILES))
        with self._writing(CONFIG_FILE):
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(self.folder / CONFIG_FILE, lambda p: p.write_text(to_yaml(cfg)))
        if self.held_out is not None:  # resume and `make eval` read it (train/data/val_split.py)
            with self._writing(VAL_SPLIT_FILE):
                write_split(self.folder / VAL_SPLIT_FILE, self.held_out, cfg.data.val_fraction,
                            cfg.seed)
        self.records = [r for r in self._read_records() if r["epoch"] <= (resumed_epochs or 0)]
        with self._writing(METRICS_FILE):
            atomic_write(self.metrics_path, lambda p: p.write_text(
                "".join(json.dumps(r) + "\n" for r in self.records)))
        point_latest(self.folder)  # runs/latest: this run, the newest started

    def _set_aside(self, names: list[str]) -> None:
        """Move `names` into replaced/ in one step: into replaced.partial/ first (config.yaml
        last), then renamed; a move cut short is put back by `restore_interrupted_move`."""
        names = [n for n in names if (self.folder / n).exists()]
        replaced, partial = self.folder / REPLACED_DIR, self.folder / REPLACING_DIR
        if not names:
            return
        if replaced.exists():
            if not any((self.folder / CHECKPOINT_DIR).glob("step_*.pt")):
                # An attempt that never wrote a checkpoint; the run set aside before it stays.
                for name in names:
                    _remove(self.folder / name)
                return
            shutil.rmtree(replaced)  # the run here has checkpoints: the older one is obsolete
        partial.mkdir()
        for name in sorted(names, key=lambda n: n == CONFIG_FILE):
            os.rename(self.folder / name, partial / name)
        fsync_folder(partial)
        os.rename(partial, replaced)
        fsync_folder(self.folder)
        log.info("the run this one replaces is in %s until this run's first checkpoint",
                 replaced)

    def checkpoint_written(self) -> None:
        """This run has a checkpoint of its own: the run it replaced can go."""
        replaced = self.folder / REPLACED_DIR
        if replaced.exists():
            shutil.rmtree(replaced, ignore_errors=True)

    def save_classes(self, names: list[str]) -> None:
        """classes.json: class index -> name, as the model's outputs are numbered."""
        atomic_write(self.folder / CLASSES_FILE, lambda p: p.write_text(json.dumps(names) + "\n"))

    def _read_records(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def log_epoch(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with self._writing(METRICS_FILE), self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def finish(self, summary: dict[str, Any]) -> None:
        with self._writing(SUMMARY_FILE):
            atomic_write(self.folder / SUMMARY_FILE,
                         lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """A full disk (or any failed write) is one line naming the last valid checkpoint."""
        try:
            yield
        except OSError as exc:
            last = Checkpoints(self.checkpoint_dir, keep=1).newest_complete()
            raise write_failure(exc, what, self.folder, last) from None


class NullRun(RunFolder):
    """What non-main ranks write: nothing (they may read checkpoints, never write)."""

    def start(self, cfg: Config, resumed_epochs: int | None = None) -> None:
        pass

    def checkpoint_written(self) -> None:
        pass

    def save_classes(self, names: list[str]) -> None:
        pass

    def log_epoch(self, record: dict[str, Any]) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass


def open_run(cfg: Config, ctx: DistContext, stack: contextlib.ExitStack) -> RunFolder:
    """The main worker takes the folder's lock (held until `stack` closes) and checks
    `run.dir`; every rank gets the verdict (whether an old run is replaced, and so not
    resumed). Nothing on disk changes before `start`, besides the lock."""
    folder = Path(cfg.run.dir)

    def check() -> bool:
        why = why_not_writable(folder)  # only the main worker writes there
        if why:
            raise UserError(f"run.dir {folder} cannot be created or written: {why}")
        lock = stack.enter_context(RunLock(folder, os.environ.get("TORCHELASTIC_RUN_ID")))
        if lock.taken_over is not None:
            log.warning("%s: took over the lock of %s, which is gone", lock.path,
                        lock.taken_over)
        restore_interrupted_move(folder)
        return check_run_dir(cfg)

    replace = from_main(ctx, check)
    return (RunFolder if ctx.is_main else NullRun)(folder, replace)


def restore_interrupted_move(folder: Path) -> None:
    """A replacement cut short while moving the old run aside: put its files back."""
    partial = folder / REPLACING_DIR
    if not partial.is_dir():
        return
    for entry in partial.iterdir():
        if not (folder / entry.name).exists():
            os.rename(entry, folder / entry.name)
    with contextlib.suppress(OSError):
        partial.rmdir()
    log.warning("%s: put back the files of the run that an interrupted replacement was moving "
                "aside", folder)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
