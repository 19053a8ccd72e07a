"""Run code the way users do: in several real gloo processes, or through the real CLI."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables torchrun gives a worker on a single node."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    if port:
        os.environ.update(torchrun_env(rank, world_size, port))
    try:
        # By value: tensors sent as shared-memory handles vanish when this process exits.
        buffer = io.BytesIO()
        torch.save(fn(*args), buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - report everything to the parent test
        queue.put((rank, "error", traceback.format_exc()))


def run_single(fn: Callable[..., Any], *args: Any, timeout: float = 180) -> Any:
    """Call `fn(*args)` in one fresh process without torchrun's variables (no process group)."""
    return run_distributed(fn, 1, *args, timeout=timeout, launched=False)[0]


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any,
                    timeout: float = 180, launched: bool = True) -> list[Any]:
    """Call `fn(*args)` in `world_size` processes that see torchrun's environment variables.

    `fn` sets up the process group itself (normally through `train.dist.setup`, the code
    under test) and must tear it down. Returns each rank's return value, in rank order.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port() if launched else 0
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
            else:
                results[rank] = torch.load(io.BytesIO(value), weights_only=True)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m <args>` from the repo (or `cwd`), as a user types it; output captured.

    Hermetic for wandb: no credentials are visible, so `wandb.mode=auto` logs offline."""
    base = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    full_env = {**base, "NETRC": os.devnull, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([PYTHON, "-m", *args], cwd=cwd or REPO, env=full_env, text=True,
                          capture_output=True, timeout=timeout)


def small_run(run_dir: Path, *extra: str) -> list[str]:
    """Overrides for a few-second LeNet run on small synthetic data."""
    return [f"run.dir={run_dir}", "data.synthetic.train_samples=1536",
            "data.synthetic.test_samples=501", "train.epochs=2", "wandb.mode=disabled", *extra]
