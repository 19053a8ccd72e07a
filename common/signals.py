"""Stop signals, from a process's first line to its end: SIGTERM (a scheduler, `kill`, a
Kubernetes pod's deletion), SIGINT (Ctrl-C), SIGHUP (a closed terminal or ssh session) and SIGUSR1
(SLURM's `--signal=USR1@N` before the time limit) all ask the job to stop, the same way.

No `import torch` here: the launcher and the workers install this before anything slow.

The launcher, before its workers exist, runs Python code only: `exit_during_startup` prints one
line and exits 130. From the moment torchrun's agent starts workers, the agent's own handlers
take over (they pass the signal on to the workers).

A worker spends much of its life in C calls (a rendezvous, a collective, a store read), where
Python runs no signal handler. `StopSignals` therefore acts from a watcher thread that the
interpreter's C-level handler wakes at once (`signal.set_wakeup_fd`):

- during start-up it exits with 130 at once: nothing has been trained, nothing needs saving;
- once the loop runs (`begin_training`), it records the request, which the ranks agree on at a
  step boundary (train/loop/guards.py StopRequest); a process that then shows no sign of progress
  (`alive`) for `stall_limit_s` seconds, outside a checkpoint write (`busy`), exits 130: it is
  stalled in a step, or waiting in a collective for a stalled peer, and would never reach the
  boundary.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from common.errors import EXIT_INTERRUPTED
from common.host import die_with_parent, leave

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
# What torchrun's agent must catch and pass on (`--signals-to-handle`): its default set
# (SIGQUIT stays there: torchrun ends its workers on it, as before), plus SIGUSR1, which it
# would otherwise leave to its default action, ending the agent without a word to its workers.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
NUDGE = signal.SIGURG  # ignored by default; wakes a thread from a sleep (held_for_children)
MIN_STALL_S = 10.0  # no sign of progress this long after a stop signal: stalled
STALL_STEPS = 3  # ... or this many typical intervals between signs of progress, if longer


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def startup_line(signum: int) -> str:
    return f"interrupted by {signal_name(signum)} during start-up: nothing was trained yet"


def exit_during_startup(prefix: str) -> None:
    """The launcher's handlers until its workers start: one line, exit 130, no traceback."""
    def handle(signum: int, frame: object) -> None:
        print(f"{prefix}{startup_line(signum)}", file=sys.stderr, flush=True)
        os._exit(EXIT_INTERRUPTED)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handle)


@contextlib.contextmanager
def held_for_children(received: list[int] | None = None) -> Iterator[None]:
    """Processes that the main thread starts inside begin with the stop signals blocked.

    torchrun passes a stop signal on to its workers, maybe while one still starts its
    interpreter: that one would die of a SIGINT with a KeyboardInterrupt traceback ("Fatal
    Python error: init_import_site") before its first line installs any handler. Blocked, the
    signal waits until StopSignals has installed them, which unblocks it: then it is the quiet
    exit 130 of any stop during start-up. (A mask survives fork and exec; handlers do not.)

    This process still takes them at once: a thread started before the block leaves them
    unblocked, the kernel hands them to it, and it nudges the main thread out of whatever
    sleep it is in (with NUDGE, never blocked), so that the handlers run there as before.
    `received` gets the stop signals this process took, in order: torchrun's agent reports
    the last one (a second signal interrupts its handling of the first), the cause is the first.
    """
    main = threading.main_thread()
    if threading.current_thread() is not main:
        yield
        return
    receive, send = socket.socketpair()
    send.setblocking(False)
    before_fd = signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
    before_nudge = signal.signal(NUDGE, _ignore)
    done = threading.Event()

    got = received if received is not None else []

    def take() -> None:
        receive.settimeout(0.25)
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                if _note(receive.recv(64), got):
                    signal.pthread_kill(main.ident or 0, NUDGE)

    taker = threading.Thread(target=take, name="stop-signal-taker", daemon=True)
    taker.start()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        done.set()
        taker.join()
        receive.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # taken, but not yet read by the taker
            _note(receive.recv(64), got)
        signal.set_wakeup_fd(before_fd)
        signal.signal(NUDGE, before_nudge)
        receive.close()
        send.close()


def _note(signums: bytes, received: list[int]) -> bool:
    """Add the stop signals among `signums` to `received`; whether there were any."""
    stops = [signum for signum in signums if signum in STOP_SIGNALS]
    received.extend(stops)
    return bool(stops)


def hold_in_child(parent: int) -> None:
    """`preexec_fn` of a `python -m train` child: the stop signals blocked until its handlers
    exist (see held_for_children), and SIGTERM when `parent` dies."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    die_with_parent(parent)


class StopSignals:
    """A worker's stop signals: exit at once during start-up, a stop request once training."""

    def __init__(self, say_startup: Callable[[int], None] | None):
        self.say_startup = say_startup  # prints the start-up line, when this process reports
        self.requested = 0  # the first stop signal's number once training, 0 when none
        self.training = False
        self.leaving_with: int | None = None  # the exit code of an error already reported
        self.busy_depth = 0  # > 0 while writing a checkpoint: no stall limit then
        # Told (signal, seconds) once, half the stall limit into a stop without progress.
        self.on_overdue: Callable[[int, float], None] | None = None
        self._overdue_told = False
        self.last_alive = time.monotonic()
        self.intervals: deque[float] = deque(maxlen=16)  # between recent signs of progress
        self._receive, send = socket.socketpair()
        send.setblocking(False)
        self._send = send  # kept open: the C-level handler writes the signal number into it
        signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
        for sig in STOP_SIGNALS:
            # A Python handler must exist, or the default action ends the process; the watcher
            # thread does the work.
            signal.signal(sig, _ignore)
        # A launcher starts its workers with them blocked (held_for_children): one that came
        # during the interpreter's start-up is delivered now, to the handlers above.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        threading.Thread(target=self._watch, name="stop-signals", daemon=True).start()

    def begin_training(self) -> None:
        """From here on a signal is a stop request for the loop, not an immediate exit."""
        self.last_alive = time.monotonic()
        self.training = True

    def leaving(self, code: int) -> None:
        """This process has reported its error and leaves with `code`: torchrun's SIGTERM to
        the workers still leaving once one has left must not turn that into 130."""
        self.leaving_with = code

    def alive(self) -> None:
        """A sign of progress: a step done, an evaluation batch done."""
        now = time.monotonic()
        self.intervals.append(now - self.last_alive)
        self.last_alive = now

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """A checkpoint write: it may take long, and it is what a stop waits for."""
        self.busy_depth += 1
        try:
            yield
        finally:
            self.busy_depth -= 1
            self.last_alive = time.monotonic()

    def stall_limit_s(self) -> float:
        typical = statistics.median(self.intervals) if self.intervals else 0.0
        return max(MIN_STALL_S, STALL_STEPS * typical)

    def _watch(self) -> None:
        self._receive.settimeout(0.25)
        while True:
            try:
                for signum in self._receive.recv(64):
                    if signum in STOP_SIGNALS:
                        self._on_signal(signum)
            except TimeoutError:
                pass
            if self.requested and not self.busy_depth:
                self._check_stall(time.monotonic() - self.last_alive, self.stall_limit_s())

    def _check_stall(self, quiet_s: float, limit_s: float) -> None:
        if quiet_s > limit_s / 2 and self.on_overdue is not None and not self._overdue_told:
            self._overdue_told = True
            with contextlib.suppress(Exception):  # a record that fails must not stop the exit
                self.on_overdue(self.requested, round(quiet_s, 1))
        if quiet_s > limit_s:
            _exit()

    def _on_signal(self, signum: int) -> None:
        if self.leaving_with is not None:
            leave(self.leaving_with, exit_functions=False)
        if not self.training:
            if self.say_startup is not None:
                self.say_startup(signum)
            _exit()
        if not self.requested:
            self.requested = signum


# One per process, as the signal dispositions and the wakeup fd it owns are per process.
_installed: StopSignals | None = None


def stop_signals(say_startup: Callable[[int], None] | None = None) -> StopSignals:
    """This process's StopSignals, installed at the first call (from the main thread)."""
    global _installed
    if _installed is None:
        _installed = StopSignals(say_startup)
    return _installed


def _ignore(signum: int, frame: object) -> None:
    return None


def _exit() -> None:
    leave(EXIT_INTERRUPTED, exit_functions=False)
