"""Where a run lives: its folder, decided once for the launcher, the doctor, the workers and the
tools (`settle_run_dir`), and `runs/latest`, which names the newest run.

A run's default folder is `runs/<run.name>-<fingerprint>`: the config's name (or `run.name`)
and a short hash of what defines the run, the keys that train/run/identity.py compares to refuse
a different run (the data by its files, not its path). The number of workers is not in it: the
global batch, and with it what the run computes, does not depend on it, so the same command on
another number of workers finds the same folder and continues the run there, re-sharded. The
same command finds its own folder again and resumes; a different command gets a folder of its
own, never a refusal. A `run.dir` given explicitly is used as it is, and a different run in
it is refused (train/run/identity.py: check_run_dir).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.schema import Config
from train.run.identity import identity

log = logging.getLogger(__name__)

RUNS = Path("runs")  # default folders live here, relative to where the command runs
LATEST = "latest"  # runs/latest: the newest run started in runs/
FINGERPRINT_DIGITS = 8  # hex digits: 4 billion values, for the few runs of one config name


def fingerprint(cfg: Config) -> str:
    """8 hex digits of the SHA-256 of the run's identity. The number of workers is no part of
    it: the global batch, and so the run, is the same on any number (a checkpoint continues
    re-sharded), and an elastic job keeps one folder at every size of its range.

    The same on every process, Python version and key order (canonical JSON, sorted keys),
    unchanged by RUNTIME keys (they are not in the identity). Keys at their schema default are
    left out: a key added to the schema later (its default is what older runs computed) keeps
    every folder's name, as `differences` reads a missing key as its default.
    """
    defaults = identity(Config())
    changed = {k: v for k, v in identity(cfg).items() if k not in defaults or defaults[k] != v}
    named: dict[str, Any] = {"identity": changed}
    text = json.dumps(named, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_DIGITS]


def default_run_dir(cfg: Config) -> Path:
    """`runs/<run.name>-<fingerprint>`, on any number of workers."""
    return RUNS / f"{cfg.run.name}-{fingerprint(cfg)}"


def settle_run_dir(cfg: Config) -> None:
    """Fill in `run.dir` (the default folder when none is given; `runs/latest` becomes the run
    it names) and `run.name` (default: the folder's name). Idempotent."""
    if not cfg.run.dir:
        if cfg.checkpoint.allow_changes:
            # Another config has another default folder: nothing to continue.
            raise UserError("checkpoint.allow_changes=true continues a run with another config "
                            "or worker count: name its folder with run.dir=... (run.dir="
                            f"{RUNS / LATEST} is the newest run)")
        cfg.run.dir = str(default_run_dir(cfg))
    else:
        cfg.run.dir = str(follow_latest(Path(cfg.run.dir)))
    if not cfg.run.name:
        cfg.run.name = Path(cfg.run.dir).name


def follow_latest(path: Path) -> Path:
    """The run folder that `runs/latest` names (a link, or the file standing in for one on file
    systems without links); any other path as it is."""
    if path.name != LATEST:
        return path
    if path.is_symlink():
        return path.parent / os.readlink(path)
    if path.is_file():
        name = path.read_text().strip()
        if name and "/" not in name and name not in (".", ".."):
            return path.parent / name
    return path


def point_latest(folder: Path) -> None:
    """Make `runs/latest` name `folder`, when the folder is in runs/ (explicit folders elsewhere
    are left alone). A relative link, made under a unique name and renamed over the old one:
    several runs starting at once each replace it whole (the last one wins) and none fails.
    Without symbolic links it is a one-line file naming the folder. Never raises: a run does not
    stop over a convenience link."""
    if folder.name == LATEST or not _in_runs(folder):
        return
    link = folder.parent / LATEST
    temp = folder.parent / f".{LATEST}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        try:
            os.symlink(folder.name, temp, target_is_directory=True)
        except OSError:  # FAT/exFAT, some network shares, Windows without the privilege
            temp.write_text(folder.name + "\n")
        os.replace(temp, link)
    except OSError as exc:
        log.warning("could not point %s at %s: %s", link, folder.name, exc.strerror or exc)
        with contextlib.suppress(OSError):
            temp.unlink()


def _in_runs(folder: Path) -> bool:
    try:
        return folder.parent.resolve() == RUNS.resolve()
    except OSError:
        return False
