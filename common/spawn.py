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
          env: Env | None = None, launched: bool = True) -> list[Any]:
    """`fn(*args)` in `world_size` processes; each rank's return value, in rank order.

    `launched`: the processes see torchrun's variables (`fn` joins the process group itself,
    e.g. with `dist.init_process_group()`, and leaves it). Results travel by value (tensors
    land on the CPU); `fn` must be importable by name.
    """
    ctx = mp.get_context("spawn")
    results_queue = ctx.Queue()
    port = free_port() if launched else 0
    procs = [ctx.Process(target=_run, args=(r, world_size, port, fn, args, results_queue,
                                            dict(env or {})))
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


def _run(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results_queue: Any,
         env: dict[str, str | None]) -> None:
    # Before `fn` runs: nothing in this process has started CUDA yet, so `env` may still
    # change which GPUs it sees.
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if port:
        os.environ.update(torchrun_env(rank, world_size, port))
    try:
        import torch

        # By value: tensors sent as shared-memory handles vanish when this process exits.
        buffer = io.BytesIO()
        torch.save(fn(*args), buffer)
        results_queue.put((rank, True, buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - everything goes to the parent, which reports it
        results_queue.put((rank, False, traceback.format_exc()))
