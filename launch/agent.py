"""After the plan: torchrun's elastic agent in this process (or, for mode dp, one child
process), and one line when a worker fails.

torchrun runs in-process so that its SIGTERM/SIGINT forwarding, restarts and rendezvous are the
real ones, and so that what it reports can be turned into one line instead of its own
tracebacks.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common import status
from common.errors import EXIT_INTERRUPTED, EXPLAINED_EXIT_CODES
from common.records import CHECKPOINT_DIR
from common.signals import (
    STOP_SIGNALS,
    held_for_children,
    hold_in_child,
    signal_name,
    startup_line,
)
from launch.hangs import collect_fatal_dumps, hang_block
from train.run.checkpoint import Checkpoints
from train.run.hang import drop_empty_fatal_dumps


def node0_answers(endpoint: str, timeout_s: float) -> bool:
    """Other nodes: poll node 0's rendezvous port (host:port) for up to `timeout_s` seconds.

    torch's c10d client would wait as long (read_timeout), but prints a C++ stack dump for each
    failed attempt before its RendezvousConnectionError. Name lookups are retried too: on some
    clusters node 0's name resolves only once node 0 is up.
    """
    host, port = endpoint.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)),
                                          timeout=min(5.0, timeout_s)):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)


def node0_silent(endpoint: str, timeout_s: float | None) -> str:
    within = f" within {timeout_s:.0f} s (dist.rendezvous_timeout_s)" if timeout_s else ""
    return (f"no rendezvous answered at {endpoint}{within}, or it went away: node 0 hosts it, "
            f"so start node 0 with the same command (or check that it is still running), and "
            f"check that --master-addr/--master-port reach node 0 from this node")


def run_torchrun(torchrun_args: list[str], verbose: bool = False,
                 rendezvous_timeout_s: float | None = None, abort_note: str | None = None,
                 run_dir: Path | None = None, backend: str = "gloo") -> int:
    """Run torchrun's elastic agent here; return 0, or the failed workers' exit code.
    `abort_note`: what a worker killed by SIGABRT means in this job (launch/plan.py);
    `run_dir`: where the workers write their hang records; after a failure, one block sums
    them up (launch/hangs.py), read as `backend`'s ranks block."""
    # Where this node's workers say whether they trained and where they stopped (only local
    # rank 0 writes it, so nothing exists unless training began).
    status_file = Path(tempfile.gettempdir()) / f"dptrain-status-{uuid.uuid4().hex}.json"
    # The workers inherit these from os.environ (torchrun copies it); undone afterwards, so that
    # workers started later in this process (a notebook, tests) never see a stale parent pid.
    told = {status.PARENT_ENV: str(os.getpid()),  # the workers' parent: see train/__main__
            status.STATUS_ENV: str(status_file)}
    before = {name: os.environ.get(name) for name in told}
    os.environ.update(told)
    try:
        return _run_agent(torchrun_args, verbose, rendezvous_timeout_s, abort_note, run_dir,
                          status_file, backend)
    finally:
        status_file.unlink(missing_ok=True)
        drop_empty_fatal_dumps(os.getpid())
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run_agent(torchrun_args: list[str], verbose: bool, rendezvous_timeout_s: float | None,
               abort_note: str | None, run_dir: Path | None, status_file: Path,
               backend: str) -> int:
    started = time.time()
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import get_args_parser, run

    if not verbose:
        # The agent logs each worker failure with pid and binary; we print one line instead.
        for name in ["torch.distributed.elastic", *logging.root.manager.loggerDict]:
            if name.startswith("torch.distributed.elastic"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    received: list[int] = []  # the stop signals, in order: the first is the cause
    try:
        with held_for_children(received):  # a Ctrl-C as they start waits for their handlers
            run(get_args_parser().parse_args(torchrun_args))
    except ChildFailedError as exc:
        code = report_failures(exc.failures, abort_note)
        report_hang(exc.failures, run_dir, backend, started)
        return code
    except SignalException as exc:
        stop_keep_alive_threads()
        report_hang({}, run_dir, backend, started)
        # torchrun passed the signal on and waited for the workers to leave.
        first = received[0] if received else exc.sigval
        print(f"launch: {interrupted(first, status.read(status_file), run_dir)}",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except RendezvousError as exc:
        # Past the launcher's own wait for node 0, so node 0 answered once: a lost connection
        # after its workers began, or sooner than the wait could run out, is node 0 going away.
        gone = status.read(status_file) is not None or (
            time.time() - started + 1 < (rendezvous_timeout_s or 0))
        print(f"error: {rendezvous_failure(exc, torchrun_args, rendezvous_timeout_s, gone)}",
              file=sys.stderr)
        return 1
    return 0


def stop_keep_alive_threads() -> None:
    """After a stop signal torchrun leaves the rendezvous open (so that other nodes may go on)
    and never stops its keep-alive thread. That thread holds the rendezvous handler while it
    beats; when the agent lets go of the handler in that moment, the handler is freed on the
    thread itself, whose finalizer then joins the thread it runs on, and Python prints a
    traceback ("Exception ignored in: <finalize object ...>", "cannot join current thread")
    after our line. Here each timer is told to stop and its finalizer is taken away, without
    waiting for the thread (a beat may be stuck on a store that went away); the rendezvous
    stays open. The names are torch's private ones: in a torch without them, nothing happens."""
    from torch.distributed.elastic.rendezvous import utils

    timer = getattr(utils, "_PeriodicTimer", None)
    if timer is None:
        return
    for thing in gc.get_objects():
        if issubclass(type(thing), timer):  # not isinstance: no `__class__` of a stranger read
            finalizer, context = getattr(thing, "_finalizer", None), getattr(thing, "_ctx", None)
            if finalizer is not None:
                finalizer.detach()
            if context is not None:
                context.stop_event.set()


def interrupted(signum: int, reported: dict | None, run_dir: Path | None) -> str:
    """What a stop signal left: a checkpoint only when one is on disk, named by its step."""
    if reported is None:
        return startup_line(signum)
    name = signal_name(signum)
    newest = (Checkpoints(run_dir / CHECKPOINT_DIR, keep=1).newest_complete()
              if run_dir is not None else None)
    stopped = reported.get("stopped_at")
    if stopped is not None and stopped == newest:
        return (f"interrupted by {name}; the workers stopped at step {stopped} and wrote a "
                f"checkpoint there: run the same command to resume")
    if newest is not None:
        return (f"interrupted by {name}; no checkpoint was written for this stop (a worker did "
                f"not reach a step boundary, or the write did not finish, in time): the last "
                f"one is step {newest}; run the same command to resume from it")
    return f"interrupted by {name}; no checkpoint was written: the same command starts over"


def rendezvous_failure(exc: Exception, torchrun_args: list[str], timeout_s: float | None,
                       gone: bool = False) -> str:
    """One line for a rendezvous that failed: what this node waited for, and what to check.
    `gone`: node 0 had answered, and its connection was lost before any wait ran out."""
    from torch.distributed.elastic.rendezvous.api import (
        RendezvousClosedError,
        RendezvousConnectionError,
        RendezvousTimeoutError,
    )

    flag = "--rdzv-endpoint"
    where = torchrun_args[torchrun_args.index(flag) + 1] if flag in torchrun_args else "?"
    within = f" within {timeout_s:.0f} s (dist.rendezvous_timeout_s)" if timeout_s else ""
    check = ("check that each node runs the same command with its own --node-rank, and that "
             "--master-addr/--master-port reach node 0")
    if isinstance(exc, RendezvousTimeoutError):  # connected, but the others did not all come
        return f"not every node joined the rendezvous{within}: {check}"
    if isinstance(exc, RendezvousConnectionError) and gone:
        return (f"the rendezvous host at {where} (node 0) went away: its connection closed "
                f"(node 0's job ended or died); check node 0, then start every node again with "
                f"the same command (it resumes from the last checkpoint)")
    if isinstance(exc, RendezvousConnectionError):  # node 0's store never answered
        return node0_silent(where, timeout_s)
    if isinstance(exc, RendezvousClosedError):
        return (f"the rendezvous at {where} is closed: the job on node 0 already ended; start "
                f"every node again together")
    return f"the rendezvous at {where} failed ({type(exc).__name__}: {exc}); {check}"


def report_hang(failures: dict, run_dir: Path | None, backend: str, since: float) -> None:
    """The hang block, when the workers of this job left records (launch/hangs.py)."""
    if run_dir is None:
        return
    try:
        collect_fatal_dumps(failures, Path(run_dir))
        block = hang_block(Path(run_dir), since, backend)
    except OSError as exc:
        block = f"hang: the records in {run_dir}/hang could not be read ({exc})"
    if block:
        print(block, file=sys.stderr, flush=True)


def run_one_process(worker_args: list[str]) -> int:
    """Mode dp: `python -m train` as one child process; signals are passed on to it."""
    # A launcher killed with SIGKILL cannot pass anything on: the kernel sends the child SIGTERM
    # instead (it checkpoints and exits), rather than leaving an orphan that holds the GPUs.
    child = subprocess.Popen([sys.executable, "-m", "train", *worker_args],
                             preexec_fn=functools.partial(hold_in_child, os.getpid()))

    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, forward)
    code = child.wait()
    return 128 - code if code < 0 else code


def report_failures(failures: dict, abort_note: str | None = None) -> int:
    """One line about the first worker that failed (torchrun then stops the others).

    Exit code 2 means that worker already explained the bad input: nothing to add. A worker
    killed by SIGABRT gets `abort_note` (on NCCL: the watchdog's collective timeout), and the
    ranks that did not abort are named: the stalled one is among them.
    """
    # torchrun stops the others with SIGTERM once one fails, and stamps failures in whole
    # seconds: the first failure is the earliest one that was not such a SIGTERM. Within one
    # second a worker killed by a signal comes first: the others' failed collectives follow
    # from its death.
    rank, first = min(failures.items(),
                      key=lambda item: (item[1].exitcode == -signal.SIGTERM, item[1].timestamp,
                                        item[1].exitcode >= 0, item[0]))
    code = first.exitcode
    if code in EXPLAINED_EXIT_CODES:
        return code
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    if code == -signal.SIGABRT and abort_note:
        others = sorted(r for r, f in failures.items() if f.exitcode != -signal.SIGABRT)
        still = f"; ranks that did not abort: {', '.join(map(str, others))}" if others else ""
        print(f"error: worker rank {rank} was killed by SIGABRT: {abort_note}{still}",
              file=sys.stderr)
    else:
        print(f"error: worker rank {rank} {how}; the other workers were stopped; its output is "
              f"above", file=sys.stderr)
    return 128 - code if code < 0 else (code if 0 < code < 126 else 1)
