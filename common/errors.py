"""Errors that end a run with one clear line from one process, never a traceback per rank.

Exit codes: 0 done, 1 crash (a bug: traceback) or, from the launcher, a rendezvous that never
formed (one line: launch/agent.py), 2 bad input, 3 a check stopped training
(diverged replicas, sample ledger, collective timeout), 4 the run folder could not be written
(a full disk, a quota, an I/O error; the last valid checkpoint is named), 130 interrupted
(SIGTERM/SIGINT/SIGHUP/SIGUSR1; the launcher says whether a checkpoint was written).
"""

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
