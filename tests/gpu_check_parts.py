"""Parts for the tests of `make gpu-check`'s runner (tests/test_gpu_check.py): each runs, as a
real part does, in a process of its own started by the runner."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tools.gpu_check import FAIL, PASS, Context, Outcome


def crashes(ctx: Context) -> Outcome:
    raise RuntimeError("CUDA error: an illegal memory access")


def fails(ctx: Context) -> Outcome:
    return Outcome(FAIL, "exit 1: boom")


def passes(ctx: Context) -> Outcome:
    # Its own budget, not the whole one; the dry run's flag travels with the context.
    return Outcome(PASS, f"fine, {ctx.left_s():.0f} s left, dry {ctx.dry}",
                   {"algbw GB/s": 12.5, "rows": [{"bytes": 1, "ms": 0.5}]})


def overruns_leaving_a_grandchild(ctx: Context) -> Outcome:
    """Starts a process that would outlive it, in a session of its own as torchrun starts its
    workers (out of reach of the part's session), says its pid, then hangs."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             start_new_session=True)
    (ctx.out / "grandchild.pid").write_text(str(child.pid))
    print(f"started {child.pid}; now hanging", flush=True)
    while True:
        time.sleep(1)
    return Outcome(PASS, f"never: {os.getpid()}")
