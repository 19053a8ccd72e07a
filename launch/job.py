"""What the launcher would start: the config, the device and the workers, decided from the
command line once (the launcher, the doctor and the checks all read this `Job`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from common.errors import UserError
from common.host import (
    backend_for,
    resolve_device_kind,
    threads_per_worker,
    usable_cores,
    visible_gpus,
)
from common.schema import Config
from train.config import load_config
from train.run_path import settle_run_dir

DEFAULT_CPU_WORKERS = 2
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class Job:
    """What the launcher would start, as far as it can be decided without stopping."""

    args: argparse.Namespace
    cfg: Config
    kind: str  # "cuda" or "cpu": the device the workers would use (or were asked to)
    nproc: int  # workers on this node (mode dp: the GPUs its process drives)
    problem: str | None  # why the device or the worker count is refused, if it is
    note: str  # the launcher's sentence about the workers
    dry: bool = False  # the doctor: look, change nothing

    @property
    def dp(self) -> bool:
        return self.cfg.mode == "dp"

    @property
    def world_size(self) -> int:
        return 1 if self.dp else self.nproc * self.args.nnodes

    @property
    def master_port(self) -> int:
        return self.args.master_port or DEFAULT_MASTER_PORT


def worker_overrides(args: argparse.Namespace) -> list[str]:
    """The user's overrides plus those the launcher's own flags imply."""
    extra = [f"mode={args.mode}"] if args.mode else []
    extra += ["dist.device=cpu"] if args.cpu else []
    return [*args.overrides, *extra]


def plan_job(args: argparse.Namespace, dry: bool = False) -> Job:
    """The config, the worker count and the run folder; UserError only for input no check can
    start from."""
    cfg = load_config(args.config, worker_overrides(args))
    if args.nnodes < 1:
        raise UserError(f"--nnodes must be at least 1; got {args.nnodes}")
    if not 0 <= args.node_rank < args.nnodes:
        raise UserError(f"--node-rank must be in 0..{args.nnodes - 1}; got {args.node_rank}")
    job = _decide_workers(args, cfg, dry)
    settle_run_dir(cfg, job.world_size)  # the workers decide the same folder (run_path.py)
    return job


def _decide_workers(args: argparse.Namespace, cfg: Config, dry: bool) -> Job:
    asked = max(args.gpus or 1, 1)
    try:
        kind = resolve_device_kind(cfg.dist.device)
    except UserError as exc:
        return Job(args, cfg, "cuda", asked, str(exc), "", dry)
    try:
        nproc, note = count_workers(args.gpus, kind)
    except UserError as exc:
        return Job(args, cfg, kind, asked, str(exc), "", dry)
    note = worker_note(cfg, kind, nproc, note)
    if cfg.mode == "dp" and kind == "cpu" and args.gpus not in (None, 1):
        # For DataParallel --gpus counts the devices of its one process, not processes.
        note += f"; --gpus {args.gpus} ignored (it counts the GPUs DataParallel drives)"
    return Job(args, cfg, kind, nproc, None, note, dry)


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


def worker_note(cfg: Config, kind: str, nproc: int, counted: str) -> str:
    """What the console says about the workers (`counted`: from count_workers)."""
    if cfg.mode == "dp":
        if kind == "cpu":
            return (f"mode dp: one process on the CPU ({usable_cores()} threads); DataParallel "
                    f"has nothing to split there (no GPUs)")
        return f"mode dp: one process, DataParallel over {nproc} GPU(s)"
    if kind == "cpu":
        threads = threads_per_worker(cfg.dist.cpu_threads, nproc)
        return f"{counted}, {threads} thread(s) each ({usable_cores()} usable cores)"
    return counted


def describe(job: Job) -> str:
    """One line: mode, workers, nodes, device kind."""
    if job.dp:
        return f"mode dp, one process on one node, {job.kind}"
    try:
        backend = backend_for(job.kind, job.cfg.dist.backend)
    except UserError:
        backend = job.cfg.dist.backend
    node = f" (this is node {job.args.node_rank})" if job.args.nnodes > 1 else ""
    return (f"mode {job.cfg.mode}, {job.nproc} worker(s) x {job.args.nnodes} node(s){node} = "
            f"{job.world_size} in all, {job.kind} ({backend})")
