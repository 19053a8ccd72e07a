"""A job about to start a new run folder while a folder beside it holds a run of the same config
that differs only in where or how it ran: say which folder, what differs, and the command that
continues it (the launcher prints it as a `launch:` line, the doctor in its run folder row).

Such a run: a default folder `runs/<run.name>-<8 hex digits>` beside this one, with a
checkpoint whose identity differs from this job's in the data's files only (`data.content`:
a copy with a file more or less), or in nothing at all (a folder named by an earlier
version's rule, which had the worker count and `data.root` in the name).
"""

from __future__ import annotations

import copy
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.records import CHECKPOINT_DIR
from common.schema import Config
from train.run.checkpoint import Checkpoints
from train.run.data_identity import CONTENT_KEY
from train.run.identity import (
    check_resumable,
    describe_differences,
    differences,
    identity,
)
from train.run.resume import is_complete

_FINGERPRINT = r"-[0-9a-f]{8}"  # train/run/location.py: FINGERPRINT_DIGITS


@dataclass
class Related:
    folder: Path
    checkpoint: Path
    state: dict[str, Any]  # the checkpoint's config (identity), world_size, epoch, step, ...
    changed: list[str]  # identity keys that differ (at most data.content)


def find_related(cfg: Config) -> Related | None:
    """The newest such run beside `run.dir` (see the module's docstring); None when there is
    none, or when `run.dir` already holds a checkpoint (this job continues it)."""
    folder = Path(cfg.run.dir)
    if _has_checkpoints(folder) or not folder.parent.is_dir():
        return None
    name = re.compile(re.escape(cfg.run.name) + _FINGERPRINT)
    mine, found = identity(cfg), []
    for other in folder.parent.iterdir():
        if other.name == folder.name or not name.fullmatch(other.name) or not other.is_dir():
            continue
        latest = Checkpoints(other / CHECKPOINT_DIR, keep=1).peek_latest()
        if latest is None:
            continue
        changed = differences(latest[1]["config"], mine)
        if set(changed) <= {CONTENT_KEY}:
            found.append(Related(other, latest[0], latest[1], changed))
    return max(found, key=lambda r: r.checkpoint.stat().st_mtime, default=None)


def related_notice(cfg: Config, world_size: int, argv: list[str]) -> str | None:
    """One line about the run `find_related` finds: which folder, what differs, and the
    command (`argv`, this job's arguments, plus run.dir=...) that continues it."""
    related = find_related(cfg)
    if related is None:
        return None
    state = related.state
    what = [describe_differences(state["config"], identity(cfg))] if related.changed else []
    if state["world_size"] != world_size:
        what.append(f"{state['world_size']} workers -> {world_size}")
    differs = "; ".join(what) or "the same run, in a folder named by an earlier version"
    if is_complete(cfg.train, int(state["epoch"]), int(state["step"])):  # nothing to continue
        return (f"{cfg.run.dir} is a new run folder; {related.folder} holds a complete run of "
                f"this config ({differs})")
    head = (f"{cfg.run.dir} is a new run folder, but {related.folder} holds a run of this "
            f"config at step {state['step']} ({differs})")
    allow = bool(related.changed)
    adopted = copy.deepcopy(cfg)
    adopted.run.dir, adopted.checkpoint.allow_changes = str(related.folder), allow
    try:
        check_resumable(adopted, state, f"checkpoint {related.checkpoint}")
    except UserError as exc:
        return f"{head}; it cannot continue with this config: {exc}"
    extra = [f"run.dir={related.folder}", *(["checkpoint.allow_changes=true"] if allow else [])]
    return f"{head}; to continue it instead: {shlex.join([*_python(), *argv, *extra])}"


def _has_checkpoints(folder: Path) -> bool:
    return bool(Checkpoints(folder / CHECKPOINT_DIR, keep=1).candidates())


def _python() -> list[str]:
    """How to start the launcher again: this interpreter, named relative to here when it is
    below the current folder (the project's .venv/bin/python)."""
    exe = Path(sys.executable)
    try:
        exe = exe.relative_to(Path.cwd())
    except ValueError:
        pass
    return [str(exe), "-m", "launch"]
