"""Every decision and check before any worker starts, once, in one process.

`plan_job` (launch/checks.py) decides the config, the device and the worker count; the checks
there each return a verdict and a detail. The launcher runs them in `LAUNCH_ORDER` and stops at
the first FAIL with one line; the doctor runs all of them as the rows of its table. `make_plan`
then builds torchrun's arguments (or, for mode dp, the one process's).
"""

from __future__ import annotations

import argparse
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from common.host import backend_for, threads_per_worker, usable_cores, visible_gpus
from common.schema import Config
from launch.checks import CHECKS, FAIL, run_check
from launch.job import Job, plan_job, worker_overrides

REPO_ROOT = Path(__file__).resolve().parent.parent

SHUTDOWN_TIMEOUT_S = 30  # after SIGTERM, workers get this long to checkpoint before SIGKILL
# Cheap checks first; the dataset one may download.
LAUNCH_ORDER = ("GPUs", "device options", "backend", "batch", "run folder", "wandb", "disk",
                "rendezvous port", "dataset")


@dataclass(frozen=True)
class Plan:
    cfg: Config
    nproc: int  # workers on this node
    nnodes: int
    node_rank: int
    device_kind: str  # "cuda" or "cpu"
    backend: str  # the workers' process-group backend ("none" for mode dp)
    threads: int  # intra-op threads per CPU worker
    torchrun_args: list[str]  # empty for mode dp: one process, no torchrun
    worker_args: list[str]  # what `python -m train` gets: the config and overrides
    note: str  # what the console says about the choice
    gpus: int = 0  # mode dp: the GPUs its one process drives (0 on the CPU)

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    @property
    def rdzv_endpoint(self) -> str:
        """host:port of the c10d rendezvous (on node 0 when there are several nodes)."""
        return self.torchrun_args[self.torchrun_args.index("--rdzv-endpoint") + 1]


def make_plan(args: argparse.Namespace) -> Plan:
    """Decide, check (the first FAIL is a UserError), then say how to start the workers."""
    job = plan_job(args)
    for name in LAUNCH_ORDER:
        verdict, detail = run_check(CHECKS[name], job, raise_errors=True)
        if verdict == FAIL:
            raise UserError(detail)
    cfg, kind = job.cfg, job.kind
    # The folder decided here, given on: a runs/latest that moves meanwhile changes nothing.
    worker_args = [str(args.config), *worker_overrides(args), f"run.dir={cfg.run.dir}",
                   f"run.name={cfg.run.name}"]
    if job.dp:
        threads = usable_cores() if kind == "cpu" else threads_per_worker(0, job.nproc)
        return Plan(cfg, 1, 1, 0, kind, "none", threads, [], worker_args, job.note,
                    gpus=job.nproc if kind == "cuda" else 0)
    torchrun_args = [
        "--nnodes", str(args.nnodes),
        "--nproc-per-node", str(job.nproc),
        *_rendezvous(job),
        "--max-restarts", str(args.max_restarts),
        "--monitor-interval", "0.5",
        "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S),
        "-m", "train", *worker_args,
    ]
    threads = threads_per_worker(cfg.dist.cpu_threads, job.nproc)
    return Plan(cfg, job.nproc, args.nnodes, args.node_rank, kind,
                backend_for(kind, cfg.dist.backend), threads, torchrun_args, worker_args, job.note)


def _rendezvous(job: Job) -> list[str]:
    args = job.args
    if args.nnodes == 1:
        # Standalone: a c10d store on 127.0.0.1, on a port the OS picks unless one is given.
        port = args.master_port if args.master_port is not None else 0
        return ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                "--rdzv-id", uuid.uuid4().hex, "--local-addr", "127.0.0.1"]
    # Node 0 hosts the c10d store; the others connect to it. Every node derives the same id.
    is_host = "true" if args.node_rank == 0 else "false"
    # join_timeout bounds the wait for the other nodes once connected; read_timeout bounds each
    # store call, the first connection included: without it a node whose node 0 never comes
    # waits torch's default 60 s, whatever dist.rendezvous_timeout_s says.
    timeout = max(1, int(job.cfg.dist.rendezvous_timeout_s))
    return ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{args.master_addr}:{job.master_port}",
            "--rdzv-id", f"{job.cfg.run.name}-{job.master_port}",
            "--rdzv-conf", f"is_host={is_host},join_timeout={timeout},read_timeout={timeout}"]


def worker_environment(plan: Plan) -> dict[str, str]:
    """Variables the workers inherit: threads per worker, the repo on the import path, and
    for mode dp the GPUs asked for."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                        os.environ.get("PYTHONPATH")]))}
    if plan.cfg.mode == "dp" and plan.device_kind == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(visible_gpus())]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:plan.gpus])
    if plan.device_kind == "cpu":
        env["OMP_NUM_THREADS"] = str(plan.threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(threads_per_worker(0, plan.nproc))
    return env
