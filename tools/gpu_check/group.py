"""Commands that cannot outlive their deadline: `make gpu-check` runs each part, and each part
each launch, as a process group that is killed whole when its time is up. A worker left over
from a part that overran would otherwise hold the GPU (its memory, its compute) into the next
part, and a pipe it keeps open would block the reader forever.

A part runs in a session of its own (`session=True`); the launches inside it get process groups
of their own in that session, so that a part can end one launch without ending itself. Ending
one ends its session (group) and its whole process tree: torchrun starts every worker in a
session of its own, out of reach of a `killpg`. The runner and the parts are subreapers, so a
worker whose parent died first still counts as theirs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

GRACE_S = 3.0  # between SIGTERM (the launcher's checkpoint-and-stop) and SIGKILL
READ_S = 5.0  # the output that is still in the pipe once the processes are gone


@dataclass
class Finished:
    returncode: int | None  # None: killed at its deadline
    output: str  # stdout and stderr together

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def last_lines(self, n: int = 3) -> str:
        lines = [line for line in self.output.splitlines() if line.strip()]
        return " / ".join(lines[-n:])[-500:]


def run_group(cmd: list[str], timeout_s: float, *, session: bool = False,
              env: dict[str, str] | None = None, cwd: Path | None = None,
              echo: Callable[[str], None] | None = None) -> Finished:
    """Run `cmd` in a new process group (`session`: a new session) for at most `timeout_s`;
    at the deadline kill the group (the session) whole and wait until it is gone."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=session, process_group=None if session else 0)
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if echo is not None:
                echo(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code: int | None = proc.wait(timeout=max(0.1, timeout_s))
    except subprocess.TimeoutExpired:
        code = None
    finally:  # also when the caller is interrupted: nothing of it stays behind
        end_all(proc, session)
    reader.join(READ_S)  # a pipe held open by something outside the group: stop reading
    return Finished(code, "".join(lines))


def end_all(proc: subprocess.Popen, session: bool) -> None:
    """End `proc`, its group (session) and every process below it: SIGTERM first when it still
    runs (the launcher's checkpoint-and-stop), SIGKILL after GRACE_S to whatever is left.

    torchrun starts each worker in a session of its own: the group does not hold them, the
    process tree does. Each round reads the tree again, and remembers whom it saw, so a worker
    whose parent died first (an orphan, no longer below `proc`) is still ended; in a
    subreaper (`become_subreaper`) such orphans stay below this process and are found anyway.
    """
    seen: dict[int, int] = {}  # pid -> its start time (a pid reused meanwhile is not ours)
    if proc.poll() is None:
        seen.update(_below(proc, session))
        _signal_group(proc.pid, signal.SIGTERM)
        for pid in seen:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seen.update(_below(proc, session))
        table = _processes()
        left = [pid for pid, start in seen.items()
                if pid in table and table[pid][0] not in ("Z", "X") and table[pid][4] == start]
        if not left:
            break
        _signal_group(proc.pid, signal.SIGKILL)  # at once, a child forked since the scan too
        for pid in left:
            _signal(pid, signal.SIGKILL)
        _reap(proc)
        time.sleep(0.05)
    proc.wait()
    _reap(proc)


_SUBREAPER = False


def become_subreaper() -> None:
    """Orphans of this process's descendants become its children (Linux), not init's: the
    runner and each part call it, so that nothing they started can slip out of the tree."""
    global _SUBREAPER
    try:
        import ctypes

        _SUBREAPER = ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # 36: SET_
    except (OSError, AttributeError):  # CHILD_SUBREAPER; not Linux: the tree and group only
        _SUBREAPER = False


def _below(proc: subprocess.Popen, session: bool) -> dict[int, int]:
    """pid -> start time of `proc` (until reaped), its descendants, its group's (session's)
    members, and a subreaper's adopted orphans."""
    table = _processes()
    children: dict[int, list[int]] = {}
    for child, (_, parent, _, _, _) in table.items():
        children.setdefault(parent, []).append(child)
    # The kernel hands out no pid still in use as a group or session id: members are ours.
    found = {p for p, (_, _, group, sid, _) in table.items()
             if (sid if session else group) == proc.pid}
    roots = ([proc.pid] if proc.returncode is None else []) + \
        ([os.getpid()] if _SUBREAPER else [])
    stack = [r for r in roots if r in table]
    found.update(stack)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    found.discard(os.getpid())
    return {pid: table[pid][4] for pid in found}


def _processes() -> dict[int, tuple[str, int, int, int, int]]:
    """pid -> (state, parent, group, session, start time) of every process (/proc; empty
    elsewhere)."""
    table = {}
    root = Path("/proc")
    for entry in root.iterdir() if (root / "self" / "stat").exists() else []:
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            table[int(entry.name)] = (fields[0], int(fields[1]), int(fields[2]), int(fields[3]),
                                      int(fields[19]))
    return table


def _reap(proc: subprocess.Popen) -> None:
    """Collect adopted orphans' exits (a subreaper's zombies), never `proc`'s own."""
    if not _SUBREAPER or proc.returncode is None:
        return
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _signal_group(pgid: int, sig: int) -> None:
    """killpg, only while the group exists (a pid no group uses any more may be reused)."""
    if any(group == pgid for _, _, group, _, _ in _processes().values()):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
