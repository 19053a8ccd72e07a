"""One job per run folder: a lock the main worker holds for the whole job.

`run.dir/job.lock` names its holder (host, pid, start time, torchrun's run id) and is locked
with flock(2), which the kernel releases when the holder dies, however it dies. On a file system
where flock does not reach across nodes (some NFS mounts, Lustre without `-o flock`) the file's
contents decide instead: the holder renews the file's modification time every `RENEW_S`
seconds, and a lock is live while its holder's process exists (same host) or, from another
host, while it was renewed within `ABANDONED_S` seconds. A lock whose holder is gone is taken
over with a warning; one taken by the same torchrun job (a restarted worker group) silently.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from common.files import fsync_file
from common.records import LOCK_FILE

RENEW_S = 10.0
ABANDONED_S = 60.0  # not renewed for this long: its holder is gone
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str  # local time, for people
    job: str | None  # TORCHELASTIC_RUN_ID: shared by the restarts of one torchrun job
    renewed_s: float  # seconds since the holder last renewed the file

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}"


def still_held(previous: Holder | None, flocked: bool | None) -> bool:
    """Whether the holder named in the file still has the lock: flock says so where it works
    (this host); the contents where it may not reach (another host) or does not exist."""
    if flocked is False:
        return True
    if previous is None or previous.renewed_s > ABANDONED_S:
        return False
    if previous.host != socket.gethostname():
        return True
    if flocked:
        return False  # the kernel released its flock: the holder is gone
    try:
        os.kill(previous.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def holder(folder: Path) -> Holder | None:
    """Who holds the lock of `folder` now (None: free, or held by someone gone). Changes nothing."""
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        flocked = _flock(fd, fcntl.LOCK_SH)
        previous = _read(fd)
        return previous if still_held(previous, flocked) else None
    finally:
        os.close(fd)


class RunLock:
    """The lock of one run folder; a context manager (`with RunLock(folder) as lock:`)."""

    def __init__(self, folder: Path, job: str | None = None):
        self.folder, self.path = folder, folder / LOCK_FILE
        self.job = job if job not in (None, "", "none") else None
        self.fd: int | None = None
        self.taken_over: Holder | None = None  # the gone holder this lock replaced, if any
        self._created_folder = False
        self._stop = threading.Event()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise UserError naming the job that has it."""
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"run.dir {self.folder} exists and is not a folder")
        self._created_folder = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"run.dir {self.folder} cannot be created ({exc.strerror})") from None
        previous = None
        for _ in range(20):  # about a second: a moment's look by `holder()` from elsewhere
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            flocked = _flock(fd, fcntl.LOCK_EX)
            if flocked and os.fstat(fd).st_ino != _inode(self.path):
                os.close(fd)  # released and removed while we opened it: lock the new file
                continue
            previous = _read(fd)
            if flocked is False:
                os.close(fd)
                time.sleep(0.05)
                continue
            same_job = previous is not None and self.job is not None and previous.job == self.job
            if still_held(previous, flocked) and not same_job:
                os.close(fd)
                raise in_use(self.folder, previous)
            if previous is not None and not same_job:
                self.taken_over = previous
            self.fd = fd
            self._write(fd)
            threading.Thread(target=self._renew, name="run-lock", daemon=True).start()
            return
        raise in_use(self.folder, previous)

    def release(self) -> None:
        """Give the lock up, removing its file (and the folder, if we created it empty)."""
        if self.fd is None:
            return
        self._stop.set()
        with contextlib.suppress(OSError):
            if os.fstat(self.fd).st_ino == _inode(self.path):
                self.path.unlink()
        os.close(self.fd)  # drops the flock
        self.fd = None
        if self._created_folder:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only when empty: a job that stopped before writing

    def _write(self, fd: int) -> None:
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": started,
                  "job": self.job}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode() + b"\n", 0)
        fsync_file(self.path)

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)


def in_use(folder: Path, previous: Holder | None) -> UserError:
    """The one line for a run folder that another job holds."""
    who = f" ({previous})" if previous else ""
    return UserError(f"{folder} is in use by another job{who}: two jobs in one run folder "
                     f"would overwrite each other's checkpoints and metrics; wait for it to "
                     f"end, or choose another run.dir (its lock: {folder / LOCK_FILE})")


def _flock(fd: int, kind: int) -> bool | None:
    """True: locked; False: someone else holds it; None: this file system has no flock."""
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in _NO_FLOCK:
            return None
        raise


def _read(fd: int) -> Holder | None:
    try:
        raw = json.loads(os.pread(fd, 4096, 0) or b"null")
        renewed = time.time() - os.fstat(fd).st_mtime
        return Holder(str(raw["host"]), int(raw["pid"]), str(raw["started"]), raw.get("job"),
                      renewed)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None
