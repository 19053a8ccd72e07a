"""Run code the way users do: in several real gloo processes, or through the real CLI.

The tests see no GPU (`hide_gpus`, called by conftest.py): every test is a CPU twin that runs
gloo workers, whatever the machine has. GPU tests give their subprocesses the machine's GPUs
back with `env=gpu_env()`.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.spawn import Env, SpawnError, free_port, spawn

__all__ = ["REPO", "PYTHON", "PARITY_RUN", "free_port", "gpu_count", "gpu_env", "hide_gpus",
           "pinned", "run_cli", "run_distributed", "run_single", "run_workers", "small_run",
           "start_nodes"]

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
# The machine's CUDA_VISIBLE_DEVICES before the tests hid the GPUs, as JSON (null: unset).
# An environment variable, so that processes started by the tests know it too.
ORIGINAL_GPUS = "DPTRAIN_TESTS_CUDA_VISIBLE_DEVICES"


def hide_gpus() -> None:
    """Hide every GPU from this process and all it starts, remembering what was visible.

    CUDA reads CUDA_VISIBLE_DEVICES once, when it starts: this must run before anything in
    this process touches the GPUs. The first call wins, so a nested pytest (or a pytest-xdist
    worker) still knows the machine's own setting.
    """
    if torch.cuda.is_initialized():
        raise RuntimeError("CUDA started before the tests could hide the GPUs (tests/conftest.py)")
    os.environ.setdefault(ORIGINAL_GPUS, json.dumps(os.environ.get("CUDA_VISIBLE_DEVICES")))
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def gpu_env(gpus: int | None = None) -> dict[str, str | None]:
    """Overrides that give a subprocess the machine's GPUs back: all, or the first `gpus`.

    For `run_cli`, `run_single` and `run_distributed` (their `env`)."""
    saved = os.environ.get(ORIGINAL_GPUS)
    visible = json.loads(saved) if saved is not None else os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpus is not None:
        ids = visible.split(",") if visible is not None else [str(i) for i in range(gpus)]
        visible = ",".join(ids[:gpus])
    return {"CUDA_VISIBLE_DEVICES": visible}


# What a machine whose CUDA can see a GPU has: the driver's control device (WSL2: its own).
NVIDIA_DEVICES = ("/dev/nvidiactl", "/dev/dxg")


@functools.cache
def gpu_count() -> int:
    """GPUs a subprocess with `gpu_env()` sees; 0 without a CUDA build or driver.

    Counted in a subprocess: this process must never start CUDA (see `hide_gpus`)."""
    if torch.version.cuda is None and torch.version.hip is None:
        return 0
    if torch.version.cuda is not None and not any(map(os.path.exists, NVIDIA_DEVICES)):
        return 0  # no NVIDIA driver: the subprocess would say 0 after 1.5 s of CPU
    try:
        result = subprocess.run(
            [PYTHON, "-c", "import torch; print(torch.cuda.device_count())"],
            env=environment(gpu_env()), text=True, capture_output=True, timeout=120)
        return int(result.stdout.split()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0


def environment(overrides: Env | None = None) -> dict[str, str]:
    """This process's environment with `overrides` applied (None values removed)."""
    env = {**os.environ, **(overrides or {})}
    return {k: v for k, v in env.items() if v is not None}


def run_single(fn: Callable[..., Any], *args: Any, timeout: float = 180,
               env: Env | None = None) -> Any:
    """Call `fn(*args)` in one fresh process without torchrun's variables (no process group)."""
    return run_distributed(fn, 1, *args, timeout=timeout, launched=False, env=env)[0]


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any,
                    timeout: float = 180, launched: bool = True,
                    env: Env | None = None) -> list[Any]:
    """Call `fn(*args)` in `world_size` processes that see torchrun's environment variables.

    `fn` sets up the process group itself (normally through `train.dist.setup`, the code
    under test) and must tear it down. Returns each rank's return value, in rank order, with
    tensors on the CPU. `env`: environment overrides, e.g. `gpu_env()` (None removes one).
    """
    try:
        # Forked from a server that imported torch once (common/spawn.py: `_context`): the
        # suite starts a few hundred such processes, each 2 s of CPU less.
        return spawn(fn, world_size, *args, timeout=timeout, env=env, launched=launched,
                     preloaded=True)
    except SpawnError as exc:
        raise AssertionError(str(exc)) from None


@dataclass(frozen=True)
class WorkersRun:
    returncode: int  # every rank's exit code (they agree)
    stdout: str  # what each rank printed, rank 0's first
    stderr: str


def run_workers(workers: int, config: str | Path, *overrides: str, timeout: float = 300,
                env: Env | None = None) -> WorkersRun:
    """`torchrun --nproc-per-node=WORKERS -m train CONFIG OVERRIDES` without an interpreter per
    worker: each rank runs the workers' own `main` (train/__main__.py) in a process forked by
    the harness (`run_distributed`), with torchrun's variables. For tests of what the workers
    do (train, checkpoint, resume, refuse what they find) rather than of the launcher, which
    adds its checks, restarts and signal handling; those tests start the real CLI."""
    from tests.workers import worker_main

    ranks = run_distributed(worker_main, workers, [str(config), *overrides], timeout=timeout,
                            env=env)
    codes = {code for code, _, _ in ranks}
    assert len(codes) == 1, f"the ranks' exit codes differ: {[code for code, _, _ in ranks]}"
    return WorkersRun(codes.pop(), "".join(out for _, out, _ in ranks),
                      "".join(err for _, _, err in ranks))


def pinned(package: str, requirements: str = "requirements.txt") -> str:
    """The version a requirements file of the repository pins `package` to (`package==X`)."""
    found = re.search(rf"^{re.escape(package)}==(\S+)$", (REPO / requirements).read_text(), re.M)
    assert found, f"{requirements} pins no {package}"
    return found.group(1)


def run_cli(*args: str, cwd: Path | None = None, env: Env | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m <args>` from the repo (or `cwd`), as a user types it; output captured.

    `env`: overrides, e.g. `gpu_env()` (None removes a variable). Hermetic for wandb: no
    credentials are visible, so `wandb.mode=auto` logs offline."""
    # DPTRAIN_PARENT_PID: a launcher run inside this process must not name it the parent
    # of workers that torchrun starts here.
    full_env = environment({"WANDB_API_KEY": None, "NETRC": os.devnull, "PYTHONPATH": str(REPO),
                            "DPTRAIN_PARENT_PID": None, **(env or {})})
    return subprocess.run([PYTHON, "-m", *args], cwd=cwd or REPO, env=full_env, text=True,
                          capture_output=True, timeout=timeout)


# The parity runs' settings: 8 steps of LeNet on small synthetic data, replicas compared at
# every step. Every path trained with them must end where one process does
# (tests/conftest.py: `one_process_reference`, run once for the whole session).
PARITY_RUN = ["data.synthetic.train_samples=1536", "data.synthetic.test_samples=301",
              "train.epochs=1", "train.max_steps=8", "train.batch_size=96", "run.overwrite=true",
              "wandb.mode=disabled", "check.sync_every_steps=1"]


def small_run(run_dir: Path, *extra: str) -> list[str]:
    """Overrides for a few-second LeNet run on small synthetic data."""
    return [f"run.dir={run_dir}", "data.synthetic.train_samples=1536",
            "data.synthetic.test_samples=501", "train.epochs=2", "wandb.mode=disabled", *extra]


def start_nodes(nnodes: str, per_node: list[list[str]], port: int | None = None,
                stdout: Any = subprocess.PIPE) -> list[subprocess.Popen]:
    """Launchers on this machine acting as nodes 0, 1, ... of one job (`--nnodes nnodes`, one
    CPU worker each, rendezvous on 127.0.0.1), each with its own arguments (config, overrides).
    Output is captured (text); the caller waits for them."""
    port = port or free_port()
    env = environment({"WANDB_API_KEY": None, "PYTHONPATH": str(REPO)})
    return [subprocess.Popen(
        [PYTHON, "-m", "launch", "--cpu", "--gpus", "1", "--nnodes", nnodes, "--node-rank",
         str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port), *extra],
        cwd=REPO, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env)
        for rank, extra in enumerate(per_node)]
