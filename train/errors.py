"""Errors that end a run with one clear line from one process, never a traceback per rank.

Exit codes: 0 done, 1 crash (a bug: traceback), 2 bad input, 3 a check stopped training
(diverged replicas, sample ledger, collective timeout), 130 interrupted (SIGINT/SIGTERM;
a checkpoint was written and the same command resumes).
"""

EXIT_USER_ERROR = 2
EXIT_CHECK_FAILED = 3
EXIT_INTERRUPTED = 130
EXPLAINED_EXIT_CODES = (EXIT_USER_ERROR, EXIT_CHECK_FAILED, EXIT_INTERRUPTED)


class UserError(Exception):
    """Something the user can fix (config, command line, files); the message is the whole report."""

    exit_code = EXIT_USER_ERROR
    agreed = False  # raised on every rank at once (train.dist.agree): they can exit together


class CheckFailed(UserError):
    """A guard stopped training: the replicas diverged, shards overlap, a collective timed out."""

    exit_code = EXIT_CHECK_FAILED
