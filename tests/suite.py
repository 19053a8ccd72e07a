"""`make test`: the suite in two passes on this machine's cores.

The first pass runs every test not marked `serial` in `--jobs` pytest-xdist processes, a test
file per process at a time (`--dist loadfile`: a module's shared runs stay one); most tests
wait on child processes for part of their time, so two files side by side keep two cores
busier than one. The second pass runs the `serial` tests, never beside the first pass: those
that bound a time (a stall limit, a rendezvous timeout, a signal's grace period) and the real
SLURM (one `slurmctld` per machine, one file). They mostly wait, so two of them run side by
side, a file per process (`SERIAL_JOBS`; one with `--jobs 1`).

`python -m tests.suite [--jobs N] [pytest arguments]`; a `-m EXPR` among the arguments narrows
both passes. Both passes run; the exit code is the first failing pass's pytest code (a pass
that selects nothing is fine).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

NOTHING_SELECTED = 5  # pytest's exit code when no test matched
SERIAL_JOBS = 2  # pytest processes in the second pass (at most --jobs)


def passes(args: list[str], jobs: int) -> list[list[str]]:
    """The two pytest command lines (without the interpreter), a user's `-m` folded into each."""
    rest, user_mark = list(args), None
    if "-m" in rest:
        at = rest.index("-m")
        user_mark = rest[at + 1]
        del rest[at:at + 2]
    def mark(expr: str) -> list[str]:
        return ["-m", f"({user_mark}) and {expr}" if user_mark else expr]
    def spread(n: int) -> list[str]:
        # In collection order, which tests/conftest.py sorts longest file first (xdist would
        # order them by their number of tests).
        return ["-n", str(n), "--dist", "loadfile", "--no-loadscope-reorder"] if n > 1 else []
    # The serial tests mostly wait (a grace period, a rendezvous timeout, SLURM's time limit):
    # two of them side by side, a file each, never beside the CPU-bound first pass.
    return [[*spread(jobs), *mark("not serial"), *rest],
            [*spread(min(jobs, SERIAL_JOBS)), *mark("serial"), *rest]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="pytest processes in the first pass")
    known, args = parser.parse_known_args(argv)
    codes = [subprocess.call([sys.executable, "-m", "pytest", *command])
             for command in passes(args, known.jobs)]  # both run: one run shows every failure
    return next((code for code in codes if code not in (0, NOTHING_SELECTED)), 0)


if __name__ == "__main__":
    sys.exit(main())
