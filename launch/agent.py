"""After the plan: torchrun's elastic agent in this process (or, for mode dp, one child
process), and one line when a worker fails.

torchrun runs in-process so that its SIGTERM/SIGINT forwarding, restarts and rendezvous are the
real ones, and so that what it reports can be turned into one line instead of its own
tracebacks.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from common.errors import EXIT_INTERRUPTED, EXPLAINED_EXIT_CODES
from common.host import die_with_parent
from launch.hangs import collect_fatal_dumps, hang_block


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
                 rendezvous_timeout_s: float | None = None, run_dir: str | None = None) -> int:
    """Run torchrun's elastic agent here; return 0, or the failed workers' exit code.

    `run_dir`: where the workers write their hang records; after a failure, one block sums
    them up (launch/hangs.py)."""
    started = time.time()
    os.environ["DPTRAIN_PARENT_PID"] = str(os.getpid())  # the workers' parent: see train/__main__
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import get_args_parser, run

    if not verbose:
        # The agent logs each worker failure with pid and binary; we print one line instead.
        for name in ["torch.distributed.elastic", *logging.root.manager.loggerDict]:
            if name.startswith("torch.distributed.elastic"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(get_args_parser().parse_args(torchrun_args))
    except ChildFailedError as exc:
        code = report_failures(exc.failures)
        report_hang(exc.failures, run_dir, started)
        return code
    except SignalException as exc:
        report_hang({}, run_dir, started)
        # torchrun passed the signal on; the workers stopped at a step boundary and saved.
        print(f"launch: interrupted by {signal.Signals(exc.sigval).name}; the workers wrote a "
              f"checkpoint at a step boundary: run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RendezvousError as exc:
        print(f"error: {rendezvous_failure(exc, torchrun_args, rendezvous_timeout_s)}",
              file=sys.stderr)
        return 1
    return 0


def rendezvous_failure(exc: Exception, torchrun_args: list[str], timeout_s: float | None) -> str:
    """One line for a rendezvous that failed: what this node waited for, and what to check."""
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
    if isinstance(exc, RendezvousConnectionError):  # node 0's store never answered, or went away
        return node0_silent(where, timeout_s)
    if isinstance(exc, RendezvousClosedError):
        return (f"the rendezvous at {where} is closed: the job on node 0 already ended; start "
                f"every node again together")
    return f"the rendezvous at {where} failed ({type(exc).__name__}: {exc}); {check}"


def report_hang(failures: dict, run_dir: str | None, since: float) -> None:
    """The hang block, when the workers of this job left records (launch/hangs.py)."""
    if run_dir is None:
        return
    try:
        collect_fatal_dumps(failures, Path(run_dir))
        block = hang_block(Path(run_dir), since)
    except OSError as exc:
        block = f"hang: the records in {run_dir}/hang could not be read ({exc})"
    if block:
        print(block, file=sys.stderr, flush=True)


def run_one_process(worker_args: list[str]) -> int:
    """Mode dp: `python -m train` as one child process; signals are passed on to it."""
    # A launcher killed with SIGKILL cannot pass anything on: the kernel sends the child SIGTERM
    # instead (it checkpoints and exits), rather than leaving an orphan that holds the GPUs.
    child = subprocess.Popen([sys.executable, "-m", "train", *worker_args],
                             preexec_fn=die_with_parent)

    def forward(signum: int, frame: object) -> None:
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = child.wait()
    return 128 - code if code < 0 else code


def report_failures(failures: dict) -> int:
    """One line about the first worker that failed (torchrun then stops the others).

    Exit code 2 means that worker already explained the bad input: nothing to add.
    """
    # torchrun stops the others with SIGTERM once one fails, and stamps failures in whole
    # seconds: the first failure is the earliest one that was not such a SIGTERM.
    rank, first = min(failures.items(),
                      key=lambda item: (item[1].exitcode == -signal.SIGTERM, item[1].timestamp,
                                        item[0]))
    code = first.exitcode
    if code in EXPLAINED_EXIT_CODES:
        return code
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    print(f"error: worker rank {rank} {how}; the other workers were stopped; its output is above",
          file=sys.stderr)
    return 128 - code if code < 0 else (code if 0 < code < 126 else 1)
