"""The checks of where a run is written: the disk's free space and the run folder (in use,
the same run, writable). Part of launch/checks.py's CHECKS."""

from __future__ import annotations

import shutil
from pathlib import Path

from common.files import why_not_writable
from common.lock import holder as lock_holder
from common.lock import in_use
from common.records import CHECKPOINT_DIR, CONFIG_FILE, REPLACED_DIR
from launch.job import Job
from launch.related_runs import related_notice
from launch.verdict import FAIL, OK, SKIP, WARN, Verdict
from train.run.checkpoint import Checkpoints
from train.run.identity import check_resumable, check_run_dir
from train.run.resume import is_complete

DISK_FAIL_BYTES = 200 * 2**20
DISK_WARN_BYTES = 2 * 2**30


def check_disk(job: Job) -> Verdict:
    existing = nearest_existing(Path(job.cfg.run.dir))
    free = shutil.disk_usage(existing).free
    detail = f"{free / 2**30:.1f} GiB free on the file system of {existing}"
    if free < DISK_FAIL_BYTES:
        return FAIL, f"{detail}: checkpoints and metrics need more"
    if free < DISK_WARN_BYTES:
        return WARN, f"{detail}: checkpoints of larger models may not fit"
    return OK, detail


def check_run_folder(job: Job) -> Verdict:
    """Not in use by another job; the same run resumes (with this world size) or is complete,
    a different one is refused (or replaced); the folder writable. The workers check it all
    again."""
    if job.args.node_rank > 0:
        return SKIP, "node 0 checks it (run.dir should be on a file system all nodes share)"
    cfg, folder = job.cfg, Path(job.cfg.run.dir)
    why = why_not_writable(folder)  # tried for real: permission bits say nothing for root
    if why:
        return FAIL, f"run.dir {folder} cannot be created or written: {why}"
    other = lock_holder(folder)
    if other is not None:
        raise in_use(folder, other)
    if check_run_dir(cfg):
        return WARN, (f"run.overwrite=true: the different run in {folder} is moved to "
                      f"{folder / REPLACED_DIR} and deleted once the new run has written its "
                      f"first checkpoint")
    files = Checkpoints(folder / CHECKPOINT_DIR, cfg.checkpoint.keep)
    if files.candidates() and cfg.checkpoint.resume:
        latest = files.peek_latest()  # the newest that opens, as the workers take it
        if latest is None:
            raise files.none_valid()
        path, state = latest
        check_resumable(cfg, state, f"checkpoint {path}")
        epochs, steps = int(state["epoch"]), int(state["step"])
        if is_complete(cfg.train, epochs, steps):
            return OK, (f"{folder}: complete ({path.name}: {epochs} epoch(s), {steps} steps); "
                        f"nothing left to train, checkpoint.resume=false trains it again")
        return OK, f"{folder}: will resume from {path.name} (epoch {epochs + 1}, step {steps})"
    if files.candidates():
        return OK, (f"{folder}: checkpoint.resume=false: starts over; its checkpoints are moved "
                    f"to {folder / REPLACED_DIR} until the new run's first checkpoint")
    notice = related_notice(cfg, job.world_size, getattr(job.args, "argv", []))
    if notice:
        return WARN, notice
    if (folder / CONFIG_FILE).is_file():
        return OK, f"{folder}: holds this run without checkpoints: starts over"
    return OK, f"{folder}: a new run folder"


def nearest_existing(path: Path) -> Path:
    """`path` or its nearest parent that exists."""
    path = path.absolute()
    return next(p for p in (path, *path.parents) if p.exists())
