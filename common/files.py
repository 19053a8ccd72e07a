"""File writes that a crash or a power loss never leaves half done."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from common.errors import WriteFailed

NO_SPACE = {errno.ENOSPC: "no space left on the device",
            errno.EDQUOT: "the disk quota is exceeded on the device"}


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temp file, flush it to the disk, rename it over `path`, then flush the
    folder: at any moment `path` is either the old file or the whole new one.

    `write(tmp)` writes the temp file. A failed write (a full disk) removes it again.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # left over by a crash
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new name in `folder` durable (file systems that cannot: no-op)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_failure(exc: OSError, what: str, run_dir: Path, last_step: int | None,
                  agreed: bool = False) -> WriteFailed:
    """The one line for a run-folder write that failed: what, where, and what is still safe.
    `agreed`: every rank raises it (DCP's write, which fails on all ranks together)."""
    last = (f"the last valid checkpoint is step {last_step}" if last_step is not None
            else "no checkpoint was written yet")
    if exc.errno in NO_SPACE:
        return WriteFailed(f"{NO_SPACE[exc.errno]} of {run_dir} writing {what}; {last}: free "
                           f"some space, then run the same command to resume", agreed)
    return WriteFailed(f"could not write {what} in {run_dir} ({exc.strerror or exc}); {last}",
                       agreed)


def why_not_writable(folder: Path) -> str | None:
    """Why `folder` (which may not exist yet) cannot be created and written, or None.

    Tried for real, in its nearest existing parent (a temp folder made and removed again):
    permission bits say nothing for root, read-only mounts or /proc and /sys.
    """
    folder = folder.absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dptrain-probe-", dir=existing))
    except OSError as exc:
        return f"{existing} is not writable ({exc.strerror})"
    return None
