"""A command's `main(argv)` called in this process, as `run_cli` would run it in a new one.

For input a command must refuse before it starts anything: the same function reads the same
arguments and prints the same line, without paying for a fresh interpreter (and torch) per
case. One real `run_cli` test per behaviour stays beside these, for what only a process shows
(the exit status the shell sees, nothing printed by other processes)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from collections.abc import Callable

from tests.helpers import REPO


def run_main(main: Callable[[list[str]], int], *argv: str) -> subprocess.CompletedProcess:
    """`main(argv)` from the repository folder, with its output captured and os.environ as it
    was afterwards. argparse's own errors (SystemExit) become the exit status."""
    stdout, stderr = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(list(argv))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["main", *argv], code, stdout.getvalue(), stderr.getvalue())


def launcher_main(monkeypatch) -> Callable[[list[str]], int]:
    """`python -m launch`'s main, unable to start workers: input it should have refused fails
    the test instead of training in this process."""
    import launch.__main__ as launcher

    def started(*args, **kwargs):
        raise AssertionError("the launcher accepted the input and started workers")

    for name in ("run_torchrun", "run_one_process", "node0_answers"):
        monkeypatch.setattr(launcher, name, started)
    return launcher.main
