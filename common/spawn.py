"""Run a function in N fresh processes that see torchrun's variables, and collect the results:
the one harness behind the doctor's allreduce check, the benchmarks and the tests.

The processes are started with `spawn` (a clean interpreter each, as torchrun gives), and never
outlive the call: a rank that fails, dies or runs past the timeout ends the others.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from common.host import in_forkserver, pause_collector, resume_collector, run_leave_functions

if in_forkserver():  # the server of `_context`, importing its preload: the collector paused
    pause_collector()

# Environment overrides; None removes a variable. The processes are not daemons: a worker may
# start processes of its own (data-loader workers).
Env = Mapping[str, str | None]


class SpawnError(RuntimeError):
    """A rank raised, died or did not answer in time; the message names it."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables torchrun gives a worker on a single node (one thread each)."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180,
          env: Env | None = None, launched: bool = True, preloaded: bool = False) -> list[Any]:
    """`fn(*args)` in `world_size` processes; each rank's return value, in rank order.

    `launched`: the processes see torchrun's variables (`fn` joins the process group itself,
    e.g. with `dist.init_process_group()`, and leaves it). Results travel by value (tensors
    land on the CPU); `fn` must be importable by name. `preloaded`: fork the processes from
    a server that has imported torch once (see `_context`), instead of a fresh interpreter each.
    """
    ctx = _context(preloaded)
    results_queue = ctx.Queue()
    port = free_port() if launched else 0
    # A forked process would see the server's environment, not this one's: send it along.
    overrides = {**os.environ, **(env or {})} if preloaded else dict(env or {})
    procs = [ctx.Process(target=_run, args=(r, world_size, port, fn, args, results_queue,
                                            overrides, preloaded))
             for r in range(world_size)]
    for p in procs:
        p.start()
    finished = False
    try:
        results = _collect(procs, results_queue, timeout)
        finished = True
        return [results[r] for r in range(world_size)]
    finally:
        for p in procs:
            p.join(timeout=30 if finished else 1)  # after a failure the others may wait forever
            if p.is_alive():
                p.kill()
                p.join()


def _collect(procs: list, results_queue: Any, timeout: float) -> dict[int, Any]:
    import torch

    deadline = time.monotonic() + timeout
    results: dict[int, Any] = {}
    while len(results) < len(procs):
        try:
            rank, ok, value = results_queue.get(timeout=min(0.5, timeout))
        except queue.Empty:
            dead = [(r, p.exitcode) for r, p in enumerate(procs)
                    if r not in results and p.exitcode not in (None, 0)]
            if dead:
                raise SpawnError(f"rank {dead[0][0]} died (exit code {dead[0][1]})") from None
            if time.monotonic() > deadline:
                raise SpawnError(f"no result from every rank within {timeout:.0f} s") from None
            continue
        if not ok:
            raise SpawnError(f"rank {rank}:\n{value}")
        results[rank] = torch.load(io.BytesIO(value), map_location="cpu", weights_only=True)
    return results


def _context(preloaded: bool) -> Any:
    """A fresh interpreter per process (what torchrun gives), or, for the test suite's many
    short runs, a fork of a server that imported torch once: about 2 s of CPU less per process,
    and 1.7 s more where the process builds a DistributedDataParallel or an optimizer (each
    imports torch._dynamo, which the server imported too; it starts no thread). The project's
    own modules are still imported afresh in each process."""
    if not preloaded:
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["common.spawn"])  # which imports torch and torch._dynamo (below)
    return ctx


def _run(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results_queue: Any,
         env: dict[str, str | None], preloaded: bool = False) -> None:
    # Before `fn` runs: nothing in this process has started CUDA yet, so `env` may still
    # change which GPUs it sees.
    if preloaded:  # `env` is the caller's whole environment
        os.environ.clear()
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if port:
        os.environ.update(torchrun_env(rank, world_size, port))
    try:
        import torch

        if preloaded and "OMP_NUM_THREADS" in os.environ:
            # torch read the variable when the server imported it: apply it as a fresh
            # interpreter would have.
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

        # By value: tensors sent as shared-memory handles vanish when this process exits.
        buffer = io.BytesIO()
        torch.save(fn(*args), buffer)
        results_queue.put((rank, True, buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - everything goes to the parent, which reports it
        results_queue.put((rank, False, traceback.format_exc()))
    finally:
        if preloaded:
            # A forked process ends with os._exit, skipping the exit functions a fresh
            # interpreter runs: the quick cleanups still run (the stack-dump file in /tmp, which
            # a later process with the same pid would otherwise find).
            run_leave_functions()


if in_forkserver():
    # What they make stays out of the collector's view, in the server and in every process it
    # forks (common/host.py).
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401

    resume_collector()
