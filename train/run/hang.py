"""Where each rank was when the job hung, written by the rank itself.

Two moments tell: a collective that timed out or lost a peer (the ranks that waited in it), and
a stop signal after which a rank never reached a step boundary (the rank that stalled, which
torchrun's SIGTERM finds wherever it is stuck). Each such rank writes into `run.dir/hang/`:

- `rank_<r>.txt`: the Python stack of every thread (`py-spy dump --native` when py-spy is
  installed, which also shows C++ frames; faulthandler's dump otherwise), after a header and,
  for a failed collective, the call that waited;
- `rank_<r>.json`: rank, step, phase, whether it waited in a collective, where (file:line), the
  reason; the launcher reads these and names, in one block, the ranks that did not reach the
  collective and where each was (launch/hangs.py).

A rank killed by a fatal signal (NCCL's watchdog aborts the process on a timed-out collective;
a segfault) cannot write either: faulthandler then dumps every thread into a file named after
its pid in the temp folder, which the launcher moves to `hang/rank_<r>.fatal.txt`.
Python-level: a rank whose main thread holds the GIL forever inside C code writes nothing.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from common import status
from common.files import atomic_write
from common.host import at_leave
from common.records import HANG_DIR

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]  # train/run/hang.py -> the repository
PY_SPY_TIMEOUT_S = 20.0  # a py-spy that does not answer by then: faulthandler's dump instead


def fatal_dump_path(pid: int, launcher: int) -> Path:
    """Where faulthandler writes worker `pid`'s stacks on a fatal signal (shared with the
    launcher, pid `launcher` or 0 when there is none, which moves the file into the run
    folder)."""
    return Path(tempfile.gettempdir()) / f"dptrain-fatal-{launcher}-{pid}.txt"


def drop_empty_fatal_dumps(launcher: int) -> None:
    """The launcher, after its workers left: the empty files of those that could not remove
    their own (killed: torchrun's SIGKILL after its shutdown timeout)."""
    for path in Path(tempfile.gettempdir()).glob(f"dptrain-fatal-{launcher}-*.txt"):
        with contextlib.suppress(OSError):
            if path.stat().st_size == 0:
                path.unlink()


def enable_fatal_dump() -> None:
    """Dump every thread's stack on SIGABRT/SIGSEGV/SIGBUS/SIGFPE/SIGILL; a normal exit
    removes the (empty) file again, and the launcher what an immediate exit leaves."""
    path = fatal_dump_path(os.getpid(), int(os.environ.get(status.PARENT_ENV) or 0))
    stream = path.open("w")
    faulthandler.enable(file=stream, all_threads=True)

    def remove() -> None:
        faulthandler.disable()
        stream.close()
        path.unlink(missing_ok=True)

    at_leave(remove)  # also when a failure or a stop signal ends the process at once


class HangRecorder:
    """This rank's hang record; `locate()` (set by the Trainer) says the step and phase."""

    def __init__(self, folder: Path | None, rank: int, world_size: int):
        self.folder = folder / HANG_DIR if folder is not None else None
        self.rank, self.world_size = rank, world_size
        self.locate: Callable[[], tuple[int, str]] = lambda: (0, "setup")
        self.written: list[Path] = []
        self.settled = False  # the rank left normally: an overdue report comes too late

    def collective_failed(self, exc: BaseException) -> None:
        """A rank that waited: its collective timed out, or a peer it waited for went away."""
        frames = traceback.extract_tb(exc.__traceback__)
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        detail = detail.rsplit("] ", 1)[-1]  # gloo's and NCCL's source location first
        call = "The call that waited (most recent call last):\n"
        self._write(True, f"its collective failed: {detail[:200]}", frames,
                    call + "".join(traceback.format_list(frames)))

    def overdue(self, signum: int, after_s: float) -> None:
        """From the stop signals' watcher thread: a stop was asked for, and this rank has shown
        no progress for `after_s` seconds (half its stall limit, common/signals.py)."""
        if self.settled:
            return
        frame = sys._current_frames().get(threading.main_thread().ident or -1)
        frames = traceback.extract_stack(frame) if frame is not None else []
        waiting = waits_in_collective(frames, backend())
        name = signal.Signals(signum).name
        self._write(waiting, f"no progress for {after_s:g} s, and {name} asked it to stop",
                    frames, "")

    def withdraw(self) -> None:
        """The rank reached a step boundary after all (a slow stop, not a hang)."""
        self.settled = True
        for path in self.written:
            path.unlink(missing_ok=True)
        self.written.clear()

    def _write(self, waiting: bool, reason: str, frames: list[traceback.FrameSummary],
               extra: str) -> None:
        if self.folder is None:
            return
        try:
            step, where = self.locate()
            self.folder.mkdir(parents=True, exist_ok=True)
            stack = self.folder / f"rank_{self.rank}.txt"
            header = (f"rank {self.rank} of {self.world_size}, pid {os.getpid()} on "
                      f"{socket.gethostname()}: step {step}, in {where}; {reason}\n\n{extra}\n")
            tool: list[str] = []
            atomic_write(stack, lambda p: tool.append(dump_stacks(p, header)))
            record = {"rank": self.rank, "world_size": self.world_size, "step": step,
                      "backend": backend(),
                      "where": where, "waiting": waiting, "reason": reason,
                      "at": repo_frame(frames), "innermost": describe_frame(frames[-1:]),
                      "stack": stack.name, "dumped_by": tool[0], "pid": os.getpid(),
                      "host": socket.gethostname(), "time": time.time(),
                      "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))}
            record_path = self.folder / f"rank_{self.rank}.json"
            atomic_write(record_path, lambda p: p.write_text(json.dumps(record) + "\n"))
            self.written += [stack, record_path]
        except Exception as exc:  # noqa: BLE001 - a failed record must not hide the failure
            log.warning("could not write the hang record into %s: %s", self.folder, exc)


def backend() -> str | None:
    """This rank's process group backend ("nccl", "gloo"), None before there is one."""
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def waits_in_collective(frames: list[traceback.FrameSummary], backend: str | None
                        ) -> bool | None:
    """Whether a rank's main thread (its `frames`) waits in a collective. gloo blocks inside
    the collective's Python call (a frame in torch.distributed); NCCL queues the collective and
    returns, and the rank blocks later where it reads a result (`.item()`) or synchronizes, so
    its stack cannot tell: None (launch/hangs.py then points at the flight recorder's traces)."""
    if backend is not None and "nccl" in backend:
        return None
    return any(f"torch{os.sep}distributed" in f.filename for f in frames)


def dump_stacks(path: Path, header: str) -> str:
    """Write `header` and every thread's stack to `path`; return the tool that dumped them."""
    path.write_text(header)
    spy = shutil.which("py-spy")
    if spy is not None:
        try:
            done = subprocess.run([spy, "dump", "--native", "--pid", str(os.getpid())],
                                  capture_output=True, text=True, timeout=PY_SPY_TIMEOUT_S)
            if done.returncode == 0 and done.stdout.strip():
                with path.open("a") as f:
                    f.write("Every thread (py-spy dump --native):\n" + done.stdout)
                return "py-spy"
        except (OSError, subprocess.SubprocessError):
            pass  # not allowed to attach (ptrace), or it hung: faulthandler below
    with path.open("a") as f:
        f.write("Every thread, most recent call first (faulthandler):\n")
        f.flush()
        faulthandler.dump_traceback(file=f, all_threads=True)
    return "faulthandler"


def repo_frame(frames: list[traceback.FrameSummary]) -> str:
    """The innermost frame in this project's code (where our code was), else the innermost."""
    ours = [f for f in frames if f.filename.startswith(str(REPO) + os.sep)
            and f"{os.sep}site-packages{os.sep}" not in f.filename]
    return describe_frame(ours[-1:] or frames[-1:])


def describe_frame(frames: list[traceback.FrameSummary]) -> str:
    if not frames:
        return "?"
    frame = frames[-1]
    name = frame.filename
    if name.startswith(str(REPO) + os.sep):
        name = os.path.relpath(name, REPO)
    return f"{name}:{frame.lineno} in {frame.name}"


class NoHangRecord(HangRecorder):
    """A single process: nothing waits on anyone."""

    def __init__(self) -> None:
        super().__init__(None, 0, 1)
