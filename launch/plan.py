"""Decide how many workers, on which devices, and build torchrun's arguments.

Everything that can be checked before starting workers is checked here, once, in one process,
so that bad input gets one clear line instead of a report from every rank.
"""

from __future__ import annotations

import argparse
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from train.config import Config, check_device_options, check_world_size, load_config
from train.data import ensure_available
from train.dist import backend_for, resolve_device_kind, usable_cores, visible_gpus
from train.errors import UserError
from train.runlog import check_run_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CPU_WORKERS = 2
DEFAULT_MASTER_PORT = 29500
SHUTDOWN_TIMEOUT_S = 30  # after SIGTERM, workers get this long to checkpoint before SIGKILL


@dataclass(frozen=True)
class Plan:
    cfg: Config
    nproc: int  # workers on this node
    nnodes: int
    node_rank: int
    device_kind: str  # "cuda" or "cpu"
    backend: str
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


def worker_overrides(args: argparse.Namespace) -> list[str]:
    """The user's overrides plus those the launcher's own flags imply."""
    extra = []
    if args.mode:
        extra.append(f"mode={args.mode}")
    if args.cpu:
        extra.append("dist.device=cpu")
    return [*args.overrides, *extra]


def make_plan(args: argparse.Namespace) -> Plan:
    overrides = worker_overrides(args)
    cfg = load_config(args.config, overrides)
    if args.nnodes < 1:
        raise UserError(f"--nnodes must be at least 1; got {args.nnodes}")
    if not 0 <= args.node_rank < args.nnodes:
        raise UserError(f"--node-rank must be in 0..{args.nnodes - 1}; got {args.node_rank}")
    kind = resolve_device_kind(cfg.dist.device)
    check_device_options(cfg, kind)
    nproc, note = count_workers(args.gpus, kind)
    backend = backend_for(kind, cfg.dist.backend)
    threads = cfg.dist.cpu_threads or max(1, usable_cores() // nproc)
    note = worker_note(cfg, kind, nproc, note)
    if args.max_restarts < 0:
        raise UserError(f"--max-restarts must not be negative; got {args.max_restarts}")
    worker_args = [str(args.config), *overrides]
    if cfg.mode == "dp":
        return _dp_plan(args, cfg, kind, nproc, threads, worker_args, note)
    check_world_size(cfg, nproc * args.nnodes)
    if args.node_rank == 0:
        check_run_dir(cfg)
    ensure_available(cfg)  # every node reads its own copy of the files
    torchrun_args = [
        "--nnodes", str(args.nnodes),
        "--nproc-per-node", str(nproc),
        *_rendezvous(args, cfg),
        "--max-restarts", str(args.max_restarts),
        "--monitor-interval", "0.5",
        "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S),
        "-m", "train", *worker_args,
    ]
    return Plan(cfg, nproc, args.nnodes, args.node_rank, kind, backend, threads, torchrun_args,
                worker_args, note)


def _dp_plan(args: argparse.Namespace, cfg: Config, kind: str, gpus: int, threads: int,
             worker_args: list[str], note: str) -> Plan:
    """DataParallel: ONE process on one node that drives `gpus` GPUs itself."""
    if args.nnodes > 1:
        raise UserError("mode dp runs one process on one node; several nodes need mode ddp or "
                        "scratch")
    if args.max_restarts:
        raise UserError(f"--max-restarts {args.max_restarts} needs torchrun workers (mode ddp or "
                        f"scratch); mode dp runs one process without torchrun, which nothing "
                        f"restarts")
    if kind == "cpu" and args.gpus not in (None, 1):
        # For DataParallel --gpus counts the devices of its one process, not processes.
        note += f"; --gpus {args.gpus} ignored (it counts the GPUs DataParallel drives)"
    check_run_dir(cfg)
    ensure_available(cfg)
    return Plan(cfg, 1, 1, 0, kind, "none", usable_cores() if kind == "cpu" else threads, [],
                worker_args, note, gpus=gpus if kind == "cuda" else 0)


def worker_note(cfg: Config, kind: str, nproc: int, counted: str) -> str:
    """What the console says about the workers (`counted`: from count_workers)."""
    if cfg.mode == "dp":
        if kind == "cpu":
            return (f"mode dp: one process on the CPU ({usable_cores()} threads); DataParallel "
                    f"has nothing to split there (no GPUs)")
        return f"mode dp: one process, DataParallel over {nproc} GPU(s)"
    if kind == "cpu":
        threads = cfg.dist.cpu_threads or max(1, usable_cores() // nproc)
        return f"{counted}, {threads} thread(s) each ({usable_cores()} usable cores)"
    return counted


def count_workers(requested: int | None, kind: str) -> tuple[int, str]:
    """Workers on this node and the sentence that says why (more GPUs than visible: error)."""
    gpus = visible_gpus()
    if requested is not None and requested < 1:
        raise UserError(f"--gpus must be at least 1; got {requested}")
    if kind == "cuda":
        if requested is not None and requested > gpus:
            raise UserError(f"{requested} GPUs asked (--gpus/GPUS) but only {gpus} visible")
        n = requested or gpus
        return n, f"{n} GPU worker(s) with nccl, one per GPU ({gpus} visible)"
    n = requested or DEFAULT_CPU_WORKERS
    why = "no GPU visible" if gpus == 0 else "CPU asked (--cpu / dist.device=cpu)"
    return n, f"{why}: {n} CPU worker(s) with gloo"


def _rendezvous(args: argparse.Namespace, cfg: Config) -> list[str]:
    if args.nnodes == 1:
        # Standalone: a c10d store on 127.0.0.1, on a port the OS picks unless one is given.
        port = args.master_port if args.master_port is not None else 0
        if port:
            require_free_port(port)
        return ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                "--rdzv-id", uuid.uuid4().hex, "--local-addr", "127.0.0.1"]
    if not args.master_addr:
        raise UserError("several nodes need --master-addr (MASTER_ADDR): the address of node 0, "
                        "reachable from every node")
    port = args.master_port or DEFAULT_MASTER_PORT
    if args.node_rank == 0:
        require_free_port(port)
    # Node 0 hosts the c10d store; the others connect to it. Every node derives the same id.
    is_host = "true" if args.node_rank == 0 else "false"
    # join_timeout bounds the wait for the other nodes once connected; read_timeout bounds each
    # store call, the first connection included: without it a node whose node 0 never comes
    # waits torch's default 60 s, whatever dist.rendezvous_timeout_s says.
    timeout = max(1, int(cfg.dist.rendezvous_timeout_s))
    return ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{args.master_addr}:{port}",
            "--rdzv-id", f"{cfg.run.name}-{port}",
            "--rdzv-conf", f"is_host={is_host},join_timeout={timeout},read_timeout={timeout}"]


def require_free_port(port: int) -> None:
    if not 0 < port < 65536:
        raise UserError(f"--master-port must be in 1..65535; got {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            raise UserError(f"port {port} is already in use (another job on this node?); choose "
                            f"another --master-port / MASTER_PORT, or leave it unset on a single "
                            f"node to get a free one") from None


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
        env["OMP_NUM_THREADS"] = str(max(1, usable_cores() // plan.nproc))
    return env
