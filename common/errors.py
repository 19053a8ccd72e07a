"""Errors that end a run with one clear line from one process, never a traceback per rank.

Exit codes: 0 done, 1 crash (a bug: traceback) or, from the launcher, a rendezvous that never
formed (one line: launch/agent.py), 2 bad input, 3 a check stopped training
(diverged replicas, sample ledger, collective timeout), 4 the run folder could not be written
(a full disk, a quota, an I/O error; the last valid checkpoint is named), 130 interrupted
(SIGTERM/SIGINT/SIGHUP/SIGUSR1; the launcher says whether a checkpoint was written).

Failures of code this project does not own (a user's model builder or dataset factory, a
weights file, a user's path, DCP, wandb) are translated where the context is known
(`outside`): one line naming the thing and the cause, with the exit code of its class (a disk
that refused a write: 4; anything else: 2). Exit 1 with a traceback is left to bugs of ours.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

EXIT_USER_ERROR = 2
EXIT_CHECK_FAILED = 3
EXIT_WRITE_FAILED = 4
EXIT_INTERRUPTED = 130
EXPLAINED_EXIT_CODES = (EXIT_USER_ERROR, EXIT_CHECK_FAILED, EXIT_WRITE_FAILED, EXIT_INTERRUPTED)


class UserError(Exception):
    """Something the user can fix (config, command line, files); the message is the whole report."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str, agreed: bool = False):
        super().__init__(message)
        # Raised on every rank at once (from the same gathered data, or train.dist.agree):
        # one rank reports it and all exit together.
        self.agreed = agreed


class CheckFailed(UserError):
    """A guard stopped training: the replicas diverged, shards overlap, a collective timed out."""

    exit_code = EXIT_CHECK_FAILED


class WriteFailed(UserError):
    """The run folder could not be written: a full disk, a quota, an I/O error."""

    exit_code = EXIT_WRITE_FAILED


class PeerFailed(UserError):
    """Another worker stopped with an error it reported itself; this one's collectives failed
    because of it. Nothing more to say: the exit code is the other worker's."""

    quiet = True

    def __init__(self, rank: int, message: str, exit_code: int):
        super().__init__(f"rank {rank} failed first: {message}")
        self.exit_code = exit_code


# A disk that refused a write: the class of a full disk wherever it happens (exit 4).
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO)


def cause(exc: BaseException) -> str:
    """The cause of a failure in code this project does not own, in a few words: the OS's
    reason and file for an OSError, else the exception's kind and its text's first sentence."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    lines = str(exc).strip().splitlines()
    first = lines[0].split(". ", 1)[0].rstrip(".")[:200] if lines else ""  # its first sentence
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def translated(exc: BaseException, what: str, hint: str = "") -> UserError:
    """`exc`, raised by something outside this project (`what`: the thing, named as the user
    knows it), as the one line of its class: a disk that refused a write is WriteFailed (4),
    anything else the user's to fix (2)."""
    kind = WriteFailed if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS else UserError
    return kind(f"{what} failed ({cause(exc)}){'; ' + hint if hint else ''}")


@contextlib.contextmanager
def outside(what: str, hint: str = "",
            passing: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """The boundary around a call into code this project does not own (a user's callable, a
    file's contents, a user's path, DCP, wandb): what it raises becomes one line naming `what`
    and the cause (`translated`). Our own UserErrors pass unchanged; so do KeyboardInterrupt
    and SystemExit, and the kinds in `passing` (the caller's own). Used inside
    `train.dist.agree`, the line is agreed across ranks."""
    try:
        yield
    except (UserError, *passing):
        raise
    except BaseException as exc:  # noqa: BLE001 - the boundary: whatever the outside raises
        inner = unwrapped(exc)
        if inner is None:
            raise
        if isinstance(inner, UserError):
            raise inner from None
        raise translated(inner, what, hint) from exc


def unwrapped(exc: BaseException) -> BaseException | None:
    """The failure behind `exc`: itself, or for DCP's CheckpointException (a BaseException that
    every rank raises when one rank's write or read failed) the first failed rank's exception,
    an OSError preferred; None for what must pass (KeyboardInterrupt, SystemExit)."""
    failures = getattr(exc, "failures", None)
    if type(exc).__name__ == "CheckpointException" and isinstance(failures, dict) and failures:
        found = [f[0] if isinstance(f, tuple) else f for _, f in sorted(failures.items())]
        return next((f for f in found if isinstance(f, OSError)), found[0])
    return exc if isinstance(exc, Exception) else None
