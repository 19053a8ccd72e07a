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
from common.host import (
    ELASTIC_ENV,
    backend_for,
    threads_per_worker,
    usable_cores,
    visible_gpus,
)
from common.records import NCCL_TRACE_PREFIX
from common.schema import Config
from common.signals import TORCHRUN_SIGNALS
from common.validate import SECTIONS
from launch.checks import CHECKS, FAIL, WARN, run_check
from launch.job import Job, plan_job, worker_overrides

REPO_ROOT = Path(__file__).resolve().parent.parent

SHUTDOWN_TIMEOUT_S = 30  # after SIGTERM, workers get this long to checkpoint before SIGKILL
# Cheap checks first (the config's: every section of common/validate.py); the dataset one may
# download.
LAUNCH_ORDER = ("GPUs", *SECTIONS, "restarts", "initial weights", "backend", "run folder",
                "wandb", "disk", "rendezvous port", "dataset",
                "pretrained weights")


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
    min_nodes: int | None = None  # an elastic job's MIN (`nnodes` is then its MAX)
    notes: tuple[str, ...] = ()  # what the launcher says before it starts (launch/__main__.py)

    @property
    def world_size(self) -> int:
        """Workers in all (an elastic job: with all MAX nodes)."""
        return self.nproc * self.nnodes

    @property
    def elastic(self) -> bool:
        return self.min_nodes is not None and self.min_nodes < self.nnodes

    @property
    def rdzv_endpoint(self) -> str:
        """host:port of the c10d rendezvous (on node 0 when there are several nodes)."""
        return self.torchrun_args[self.torchrun_args.index("--rdzv-endpoint") + 1]


def make_plan(args: argparse.Namespace) -> Plan:
    """Decide, check (the first FAIL is a UserError), then say how to start the workers."""
    job = plan_job(args)
    notes = []
    for name in LAUNCH_ORDER:
        verdict, detail = run_check(CHECKS[name], job, raise_errors=True)
        if verdict == FAIL:
            raise UserError(detail)
        if verdict == WARN and name == "run folder":  # a run replaced, or one to continue
            notes.append(detail)
    cfg, kind = job.cfg, job.kind
    # The folder decided here, given on: a runs/latest that moves meanwhile changes nothing.
    worker_args = [str(args.config), *worker_overrides(args), f"run.dir={cfg.run.dir}",
                   f"run.name={cfg.run.name}"]
    if job.dp:
        threads = usable_cores() if kind == "cpu" else threads_per_worker(0, job.nproc)
        return Plan(cfg, 1, 1, 0, kind, "none", threads, [], worker_args, job.note,
                    gpus=job.nproc if kind == "cuda" else 0, notes=tuple(notes))
    nodes = job.nodes
    torchrun_args = [
        "--nnodes", str(nodes),
        "--nproc-per-node", str(job.nproc),
        *_rendezvous(job),
        "--max-restarts", str(args.max_restarts),
        "--monitor-interval", "0.5",
        *optional_torchrun_flags(torchrun_options()),
        "-m", "train", *worker_args,
    ]
    threads = threads_per_worker(cfg.dist.cpu_threads, job.nproc)
    return Plan(cfg, job.nproc, nodes.max, args.node_rank, kind,
                backend_for(kind, cfg.dist.backend), threads, torchrun_args, worker_args, job.note,
                min_nodes=nodes.min if nodes.elastic else None, notes=tuple(notes))


def torchrun_options() -> frozenset[str]:
    """Every option string the installed torchrun's own parser accepts."""
    from torch.distributed.run import get_args_parser  # late: it imports torch.distributed

    return frozenset(option for action in get_args_parser()._actions
                     for option in action.option_strings)


def optional_torchrun_flags(known: frozenset[str]) -> list[str]:
    """The flags that are not in every supported torchrun, each only where its parser takes
    it: torch 2.11's has no --shutdown-timeout (its agent waits a fixed 30 s, the same), and
    an unknown flag makes torchrun exit 2 before any worker starts. Asked of the parser, not
    of the version: a backport or a removal is then right too."""
    # --signals-to-handle: torchrun's agent also catches and passes on SIGUSR1 (SLURM's warning
    # before the time limit); without it, SIGUSR1 would end the agent itself.
    wanted = [("--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)),
              ("--signals-to-handle", TORCHRUN_SIGNALS)]
    return [item for flag, value in wanted if flag in known for item in (flag, value)]


def _rendezvous(job: Job) -> list[str]:
    args, dist = job.args, job.cfg.dist
    if not job.nodes.several:
        # Standalone: a c10d store on 127.0.0.1, on a port the OS picks unless one is given.
        port = args.master_port if args.master_port is not None else 0
        return ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                "--rdzv-id", uuid.uuid4().hex, "--local-addr", "127.0.0.1"]
    # Node 0 hosts the c10d store; the others connect to it. Every node derives the same id.
    is_host = "true" if args.node_rank == 0 else "false"
    # join_timeout bounds the wait for the other nodes once connected; read_timeout bounds each
    # store call, the first connection included: without it a node whose node 0 never comes
    # waits torch's default 60 s, whatever dist.rendezvous_timeout_s says.
    # last_call_timeout: once MIN nodes of an elastic range are there, how long to wait for
    # more; keep_alive_interval: a node that missed 3 heartbeats has left, and only then does a
    # shrunken group start again without it.
    timeout = max(1, int(dist.rendezvous_timeout_s))
    conf = (f"is_host={is_host},join_timeout={timeout},read_timeout={timeout},"
            f"last_call_timeout={dist.rendezvous_last_call_s},"
            f"keep_alive_interval={dist.node_heartbeat_s}")
    return ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{args.master_addr}:{job.master_port}",
            "--rdzv-id", f"{job.cfg.run.name}-{job.master_port}", "--rdzv-conf", conf]


def worker_environment(plan: Plan) -> dict[str, str]:
    """Variables the workers inherit: threads per worker, the repo on the import path, and
    for mode dp the GPUs asked for."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                        os.environ.get("PYTHONPATH")]))}
    if plan.cfg.mode == "dp" and plan.device_kind == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(visible_gpus())]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:plan.gpus])
    if plan.elastic:
        env[ELASTIC_ENV] = f"{plan.min_nodes}:{plan.nnodes}"
        # The workers' store then lives in global rank 0 and is new for each worker group.
        # torchrun's shared store lives in the agent of a round's leader, which publishes its
        # address only when it first creates it (dynamic_rendezvous.py, next_rendezvous): a
        # node that joined later waited for that address until its timeout, and the whole job
        # failed (tried here: two nodes, a third joining); a restarted group would also see
        # the previous group's keys when its restart count did not change (a join).
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    if plan.device_kind == "cpu":
        env["OMP_NUM_THREADS"] = str(plan.threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(threads_per_worker(0, plan.nproc))
    if plan.backend == "nccl":
        env.update(flight_recorder(plan.cfg.run.dir))
    return env


def flight_recorder(run_dir: str) -> dict[str, str]:
    """PyTorch's NCCL flight recorder: every rank keeps its last collectives in a ring buffer
    and, when its watchdog times a collective out, writes them to `run.dir/nccl_trace_rank_<r>`
    (read with `python -m torch.distributed.flight_recorder.fr_trace`). Values the user set
    stay as they are."""
    wanted = {
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",  # collectives kept per rank
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(Path(run_dir).absolute() / NCCL_TRACE_PREFIX),
    }
    return {key: value for key, value in wanted.items() if key not in os.environ}


def abort_note(plan: Plan) -> str | None:
    """What a worker killed by SIGABRT means in this job: on NCCL, its watchdog's timeout."""
    if plan.backend != "nccl":
        return None
    traces = os.environ.get("TORCH_NCCL_DEBUG_INFO_TEMP_FILE",
                            str(Path(plan.cfg.run.dir).absolute() / NCCL_TRACE_PREFIX))
    folder, prefix = os.path.split(traces)
    return (f"on NCCL that is its watchdog ending a collective that waited longer than "
            f"dist.timeout_s={plan.cfg.dist.timeout_s:g} s: another worker stalled or died (the "
            f"rank named noticed first); each rank's collective trace is in {traces}<rank>, "
            f"read them with `python -m torch.distributed.flight_recorder.fr_trace {folder} "
            f"-p {prefix}`")
