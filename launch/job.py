"""What the launcher would start: the config, the device and the workers, decided from the
command line once (the launcher, the doctor and the checks all read this `Job`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from common.config import load_config
from common.errors import UserError
from common.host import (
    backend_for,
    resolve_device_kind,
    threads_per_worker,
    usable_cores,
    visible_gpus,
)
from common.schema import Config
from common.validate import World
from launch.gpu_stack import unusable_gpus
from train.run.location import settle_run_dir

DEFAULT_CPU_WORKERS = 2
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class Nodes:
    """`--nnodes N`, or `MIN:MAX` for an elastic job: torchrun runs it on as many nodes of the
    range as are there, and restarts the worker group when one leaves or joins."""

    min: int
    max: int

    @property
    def elastic(self) -> bool:
        return self.min < self.max

    @property
    def several(self) -> bool:
        """The job may span nodes: a rendezvous at MASTER_ADDR, hosted by node 0."""
        return self.max > 1

    def __str__(self) -> str:
        return f"{self.min}:{self.max}" if self.elastic else str(self.max)


def parse_nodes(text: str | int) -> Nodes:
    """`N` or `MIN:MAX` (torchrun's syntax); one line naming the flag when it is not."""
    low, _, high = str(text).strip().partition(":")
    try:
        nodes = Nodes(int(low), int(high or low))
    except ValueError:
        raise UserError(f"--nnodes expects N or MIN:MAX (whole numbers); got {text!r}") from None
    if nodes.min < 1:
        raise UserError(f"--nnodes must be at least 1; got {text}")
    if nodes.min > nodes.max:
        raise UserError(f"--nnodes {text}: MIN must not exceed MAX (an elastic job runs on "
                        f"MIN to MAX nodes)")
    return nodes


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
    def nodes(self) -> Nodes:
        return parse_nodes(self.args.nnodes)

    @property
    def world_size(self) -> int:
        """Workers in all (an elastic job: with every node of its range there)."""
        return 1 if self.dp else self.nproc * self.nodes.max

    @property
    def world(self) -> World:
        """What common/validate.py checks the config against."""
        nodes = self.nodes
        return World(size=self.world_size, device=self.kind, nodes=nodes.max,
                     min_nodes=nodes.min if nodes.elastic and not self.dp else None)

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
    nodes = parse_nodes(args.nnodes)
    if not 0 <= args.node_rank < nodes.max:
        raise UserError(f"--node-rank must be in 0..{nodes.max - 1}; got {args.node_rank}")
    job = _decide_workers(args, cfg, dry)
    # The workers decide the same folder (train/run/location.py), on any number of them.
    settle_run_dir(cfg)
    return job


def _decide_workers(args: argparse.Namespace, cfg: Config, dry: bool) -> Job:
    asked = max(args.gpus or 1, 1)
    try:
        kind = resolve_device_kind(cfg.dist.device)
    except UserError as exc:
        return Job(args, cfg, "cuda", asked, unusable_gpus() or str(exc), "", dry)
    if kind == "cpu" and cfg.dist.device != "cpu":
        # torch sees no GPU and CPU workers were not asked for (--cpu, dist.device=cpu): GPUs
        # the driver shows are a torch that does not fit it, not a CPU machine.
        problem = unusable_gpus()
        if problem:
            return Job(args, cfg, "cuda", asked, problem, "", dry)
    try:
        # For mode dp --gpus counts the GPUs of its one process: never more than visible.
        nproc, note = count_workers(args.gpus, kind,
                                    "auto" if cfg.mode == "dp" else cfg.dist.backend)
    except UserError as exc:
        return Job(args, cfg, kind, asked, str(exc), "", dry)
    note = worker_note(cfg, kind, nproc, note)
    if cfg.mode == "dp" and kind == "cpu" and args.gpus not in (None, 1):
        # For DataParallel --gpus counts the devices of its one process, not processes.
        note += f"; --gpus {args.gpus} ignored (it counts the GPUs DataParallel drives)"
    return Job(args, cfg, kind, nproc, None, note, dry)


def count_workers(requested: int | None, kind: str, backend: str = "auto") -> tuple[int, str]:
    """Workers on this node and the sentence that says why (more GPUs than visible: error,
    unless gloo lets the workers share them: common/host.py `gpu_of_worker`)."""
    gpus = visible_gpus()
    if requested is not None and requested < 1:
        raise UserError(f"--gpus must be at least 1; got {requested}")
    if kind == "cuda":
        backend = "nccl" if backend == "auto" else backend
        if backend != "gloo" and requested is not None and requested > gpus:
            raise UserError(f"{requested} GPUs asked (--gpus/GPUS) but only {gpus} visible; "
                            f"NCCL runs one worker per GPU (dist.backend=gloo lets workers "
                            f"share GPUs)")
        n = requested or gpus
        if backend == "gloo":
            shared = f", sharing them (local rank mod {gpus})" if n > gpus else ""
            return n, f"{n} GPU worker(s) with gloo on {gpus} visible GPU(s){shared}"
        return n, f"{n} GPU worker(s) with {backend}, one per GPU ({gpus} visible)"
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
    nodes = job.nodes
    node = f" (this is node {job.args.node_rank})" if nodes.several else ""
    sizes = job.world.sizes
    total = f"{sizes[0]} to {sizes[-1]}" if nodes.elastic else str(job.world_size)
    return (f"mode {job.cfg.mode}, {job.nproc} worker(s) x {nodes} node(s){node} = "
            f"{total} in all, {job.kind} ({backend})")
