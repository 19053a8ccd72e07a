"""`python -m launch.doctor [launcher flags] CONFIG [key=value ...]`: what would go wrong, before
launching.

Takes exactly the launcher's arguments, runs every check (unlike the launcher, which stops at
the first problem) and prints one row per check: OK, WARN (the job may still run), FAIL (it
would not) or SKIP (does not apply). Exit 1 when a check fails, 0 otherwise; 2 when the config
itself cannot be loaded. The checks call the launcher's and the workers' own functions, so
the doctor and the job cannot disagree about what is wrong.
"""

from __future__ import annotations

import argparse
import copy
import errno
import importlib.util
import ipaddress
import os
import queue
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from launch.__main__ import parse_args
from launch.plan import (
    DEFAULT_MASTER_PORT,
    count_workers,
    require_free_port,
    worker_note,
    worker_overrides,
)
from train.config import Config, check_device_options, check_world_size, load_config
from train.data import dataset_folder, ensure_available, torchvision_class
from train.dist import backend_for, resolve_device_kind, visible_gpus
from train.errors import EXIT_USER_ERROR, UserError
from train.runlog import check_run_dir
from train.tracking import credentials, resolve_mode

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"
CONNECT_TIMEOUT_S = 3.0  # a TCP connect (or name lookup) that takes longer counts as no answer
ALLREDUCE_BYTES = 4 * 2**20  # float32, the size of a small gradient bucket
ALLREDUCE_REPEATS = 5
ALLREDUCE_TIMEOUT_S = 60.0  # process start, rendezvous and every all_reduce, all together
DISK_FAIL_BYTES = 200 * 2**20
DISK_WARN_BYTES = 2 * 2**30


@dataclass(frozen=True)
class Job:
    """What the launcher would start, as far as it can be decided without stopping."""

    args: argparse.Namespace
    cfg: Config
    kind: str  # "cuda" or "cpu": the device the workers would use (or were asked to)
    nproc: int  # workers on this node (the number asked for when it cannot be had)
    problem: str | None  # why the device or the worker count is refused, if it is
    note: str  # the launcher's sentence about the workers

    @property
    def dp(self) -> bool:
        return self.cfg.mode == "dp"

    @property
    def world_size(self) -> int:
        return 1 if self.dp else self.nproc * self.args.nnodes

    @property
    def master_port(self) -> int:
        return self.args.master_port or DEFAULT_MASTER_PORT


def plan_job(args: argparse.Namespace) -> Job:
    """The config and the worker count; UserError only for input no check can start from."""
    cfg = load_config(args.config, worker_overrides(args))
    if args.nnodes < 1:
        raise UserError(f"--nnodes must be at least 1; got {args.nnodes}")
    if not 0 <= args.node_rank < args.nnodes:
        raise UserError(f"--node-rank must be in 0..{args.nnodes - 1}; got {args.node_rank}")
    asked = max(args.gpus or 1, 1)
    try:
        kind = resolve_device_kind(cfg.dist.device)
    except UserError as exc:
        return Job(args, cfg, "cuda", asked, str(exc), "")
    try:
        nproc, note = count_workers(args.gpus, kind)
    except UserError as exc:
        return Job(args, cfg, kind, asked, str(exc), "")
    note = worker_note(cfg, kind, nproc, note)
    return Job(args, cfg, kind, nproc, None, note)


def describe(job: Job) -> str:
    """The header: mode, workers, nodes, device kind."""
    if job.dp:
        return f"mode dp, one process on one node, {job.kind}"
    try:
        backend = backend_for(job.kind, job.cfg.dist.backend)
    except UserError:
        backend = job.cfg.dist.backend
    node = f" (this is node {job.args.node_rank})" if job.args.nnodes > 1 else ""
    return (f"mode {job.cfg.mode}, {job.nproc} worker(s) x {job.args.nnodes} node(s){node} = "
            f"{job.world_size} in all, {job.kind} ({backend})")


# --- the checks: each returns (verdict, detail); a UserError raised inside is a FAIL ----------


def check_gpus(job: Job) -> tuple[str, str]:
    if job.problem:
        return FAIL, job.problem
    if job.kind == "cuda":
        names = sorted({torch.cuda.get_device_name(i) for i in range(visible_gpus())})
        return OK, f"{job.note}: {', '.join(names)}"
    return OK, job.note


def check_options(job: Job) -> tuple[str, str]:
    """Options the device cannot run, and launcher flags that contradict the mode."""
    problems, warnings = [], []
    try:
        warnings = check_device_options(job.cfg, job.kind)
    except UserError as exc:
        problems.append(str(exc))
    if job.dp and job.args.nnodes > 1:
        problems.append("mode dp runs one process on one node; several nodes need mode ddp or "
                        "scratch")
    if job.args.max_restarts < 0:
        problems.append(f"--max-restarts must not be negative; got {job.args.max_restarts}")
    if problems:
        return FAIL, "; ".join(problems)
    if warnings:
        return WARN, "; ".join(warnings)
    return OK, (f"precision {job.cfg.perf.precision}, up to {job.args.max_restarts} "
                f"restart(s)")


def check_backend(job: Job) -> tuple[str, str]:
    if job.dp:
        return SKIP, "mode dp: one process, no process group"
    backend = backend_for(job.kind, job.cfg.dist.backend)
    available = dist.is_available() and {"nccl": dist.is_nccl_available,
                                         "gloo": dist.is_gloo_available}[backend]()
    if not available:
        hint = "; install a CUDA build of torch, or use --cpu (gloo)" if backend == "nccl" else ""
        return FAIL, f"this torch build ({torch.__version__}) has no {backend}{hint}"
    version = ""
    if backend == "nccl":
        version = " " + ".".join(map(str, torch.cuda.nccl.version()))
    return OK, f"{backend}{version} is available in torch {torch.__version__}"


def check_port(job: Job) -> tuple[str, str]:
    if job.dp:
        return SKIP, "mode dp: one process, no rendezvous"
    if job.args.nnodes == 1 and job.args.master_port is None:
        return OK, "single node: a free port is picked at launch"
    if job.args.nnodes > 1 and job.args.node_rank > 0:
        return SKIP, f"node 0 hosts the rendezvous on port {job.master_port}"
    require_free_port(job.master_port)
    return OK, f"port {job.master_port} is free on this node"


def check_master(job: Job) -> tuple[str, str]:
    """Several nodes: node 0 must own MASTER_ADDR; the others must reach it."""
    if job.args.nnodes == 1:
        return SKIP, "single node: the rendezvous is on 127.0.0.1"
    host, port = job.args.master_addr, job.master_port
    if not host:
        return FAIL, ("several nodes need --master-addr (MASTER_ADDR): the address of node 0, "
                      "reachable from every node")
    try:
        addresses = resolve(host, port)
    except OSError as exc:
        return FAIL, f"MASTER_ADDR {host!r} does not resolve ({_why(exc)})"
    if job.args.node_rank == 0:
        return _check_own_address(host, addresses)
    try:
        with socket.create_connection((addresses[0], port), timeout=CONNECT_TIMEOUT_S):
            return OK, f"{host}:{port} ({addresses[0]}) accepts connections"
    except OSError as exc:
        if exc.errno == errno.ENETUNREACH:
            return FAIL, f"no route from this machine to {host} ({addresses[0]}): {_why(exc)}"
        return WARN, (f"nothing listens there yet ({host}:{port}: {_why(exc)}): start node 0 "
                      f"first; if it is up, check the address, the port and firewalls")


def _check_own_address(host: str, addresses: list[str]) -> tuple[str, str]:
    own = [a for a in addresses if _can_bind(a)]
    if not own:
        named = "" if addresses == [host] else f" is {', '.join(addresses)}"
        return FAIL, (f"MASTER_ADDR is not an address of this machine ({host}{named}): node 0 "
                      f"hosts the rendezvous there; give node 0's own address")
    if ipaddress.ip_address(own[0]).is_loopback:
        return WARN, (f"{host} ({own[0]}) is a loopback address: only nodes on this machine "
                      f"can reach it; give the address the other nodes use")
    return OK, f"{host} ({own[0]}) is an address of this machine"


def check_allreduce(job: Job) -> tuple[str, str]:
    """A real all_reduce between two fresh processes, with the planned backend when possible."""
    if job.dp:
        return SKIP, "mode dp: one process, no collective between processes"
    backend = backend_for(job.kind, job.cfg.dist.backend)
    device, note = ("cuda" if backend == "nccl" else "cpu"), ""
    if backend == "nccl" and visible_gpus() < 2:
        backend, device = "gloo", "cpu"
        note = f"; nccl needs 2 GPUs for this test ({visible_gpus()} visible): gloo on the CPU"
    if job.args.nnodes > 1:
        note += "; on this node only (between nodes it is first exercised at launch)"
    try:
        seconds = time_allreduce(backend, device, ALLREDUCE_BYTES, ALLREDUCE_TIMEOUT_S)
    except (RuntimeError, TimeoutError) as exc:
        return FAIL, f"{backend} all_reduce between 2 processes failed: {exc}"
    algbw = ALLREDUCE_BYTES / seconds
    busbw = algbw * 2 * (2 - 1) / 2  # nccl-tests: each rank sends 2(n-1)/n of the data
    return OK, (f"{backend}, 2 x {device}, {ALLREDUCE_BYTES / 2**20:.0f} MiB float32: "
                f"{seconds * 1e3:.2f} ms, algbw {algbw / 1e9:.2f} GB/s, busbw {busbw / 1e9:.2f} "
                f"GB/s (median of {ALLREDUCE_REPEATS}){note}")


def check_dataset(job: Job) -> tuple[str, str]:
    data = job.cfg.data
    if data.name == "synthetic":
        return OK, (f"synthetic: generated in memory ({data.synthetic.train_samples:,} train / "
                    f"{data.synthetic.test_samples:,} test)")
    probe = copy.deepcopy(job.cfg)
    probe.data.download = False  # presence only: the doctor never downloads
    try:
        ensure_available(probe)
        return OK, f"{data.name}: files present in {dataset_folder(data)}"
    except UserError as missing:
        if not data.download:
            return FAIL, f"{missing} (data.download=false)"
        hosts = download_hosts(data.name)
        errors = []
        for host, port in hosts:
            error = try_connect(host, port)
            if error is None:
                return WARN, (f"missing: will be downloaded into data.root ({data.root}) from "
                              f"{host}")
            errors.append(f"{host}: {error}")
        return FAIL, f"{missing}; no download host answers ({'; '.join(errors)})"


def check_batch(job: Job) -> tuple[str, str]:
    check_world_size(job.cfg, job.world_size)
    batch, accum = job.cfg.train.batch_size, job.cfg.train.grad_accum_steps
    split = f" in {accum} micro-batches" if accum > 1 else ""
    if job.dp:
        return OK, f"mode dp: one process takes the global batch {batch}{split}"
    return OK, (f"global batch {batch} = {job.world_size} worker(s) x "
                f"{batch // job.world_size} per worker{split}")


def check_wandb(job: Job) -> tuple[str, str]:
    if job.args.node_rank > 0:
        return SKIP, "only the main worker (on node 0) logs to wandb"
    cfg = job.cfg
    mode, why = resolve_mode(cfg.wandb)
    if mode == "disabled":
        return OK, "disabled (wandb.mode=disabled): nothing is logged to wandb"
    if importlib.util.find_spec("wandb") is None:
        return FAIL, f"wandb.mode={cfg.wandb.mode} but the wandb package is not installed"
    found = credentials()
    if mode == "online" and not found:
        return FAIL, ("wandb.mode=online but no credentials: set WANDB_API_KEY or run `wandb "
                      "login`, or use wandb.mode=offline and `wandb sync` later")
    if mode == "offline":
        reason = why if cfg.wandb.mode == "offline" else "no credentials"
        return OK, (f"offline ({reason}): runs are written under {cfg.run.dir}/wandb, upload "
                    f"with `wandb sync`")
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    error = try_connect(url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    if error:
        return WARN, (f"online ({found}), but {url.hostname} does not answer ({error}); "
                      f"wandb.mode=offline logs into run.dir/wandb for a later `wandb sync`")
    return OK, f"online ({found}), project {cfg.wandb.project}"


def check_disk(job: Job) -> tuple[str, str]:
    existing = nearest_existing(Path(job.cfg.run.dir))
    free = shutil.disk_usage(existing).free
    detail = f"{free / 2**30:.1f} GiB free on the file system of {existing}"
    if free < DISK_FAIL_BYTES:
        return FAIL, f"{detail}: checkpoints and metrics need more"
    if free < DISK_WARN_BYTES:
        return WARN, f"{detail}: checkpoints of larger models may not fit"
    return OK, detail


def check_run_folder(job: Job) -> tuple[str, str]:
    from train.checkpoint import Checkpoints  # late: it imports numpy

    if job.args.node_rank > 0:
        return SKIP, "node 0 checks it (run.dir should be on a file system all nodes share)"
    cfg, folder = job.cfg, Path(job.cfg.run.dir)
    if check_run_dir(cfg):
        return WARN, f"run.overwrite=true: the different run in {folder} will be deleted"
    existing = nearest_existing(folder)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "is not a folder" if not existing.is_dir() else "is not writable"
        return FAIL, f"run.dir {folder} cannot be created: {existing} {why}"
    found = Checkpoints(folder / "checkpoints", cfg.checkpoint.keep).candidates()
    if found and cfg.checkpoint.resume:
        return OK, f"{folder}: will resume from {found[0].name}"
    if found:
        return OK, f"{folder}: checkpoint.resume=false: starts over, its checkpoints are removed"
    if (folder / "config.yaml").is_file():
        return OK, f"{folder}: holds this run without checkpoints: starts over"
    return OK, f"{folder}: a new run folder"


def nearest_existing(path: Path) -> Path:
    """`path` or its nearest parent that exists."""
    path = path.absolute()
    return next(p for p in (path, *path.parents) if p.exists())


CHECKS: list[tuple[str, Callable[[Job], tuple[str, str]]]] = [
    ("GPUs", check_gpus),
    ("device options", check_options),
    ("backend", check_backend),
    ("rendezvous port", check_port),
    ("master reachable", check_master),
    ("allreduce", check_allreduce),
    ("dataset", check_dataset),
    ("batch", check_batch),
    ("wandb", check_wandb),
    ("disk", check_disk),
    ("run folder", check_run_folder),
]


def run_check(fn: Callable[[Job], tuple[str, str]], job: Job) -> tuple[str, str]:
    """One check's verdict; it never stops the others."""
    try:
        return fn(job)
    except UserError as exc:
        return FAIL, str(exc)
    except Exception as exc:  # noqa: BLE001 - a broken check is reported, the rest still run
        return FAIL, f"the check itself failed: {type(exc).__name__}: {exc}"


# --- network ---------------------------------------------------------------------------------


def resolve(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> list[str]:
    """The IP addresses of `host`, within `timeout` seconds (getaddrinfo has no timeout of its
    own, and a dead DNS server makes it wait for 30 s or more)."""
    result: list = []

    def lookup() -> None:
        try:
            result.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            result.append(exc)

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        raise TimeoutError(f"no answer from the name server within {timeout:.0f} s")
    if isinstance(result[0], OSError):
        raise result[0]
    return list(dict.fromkeys(info[4][0] for info in result[0]))


def try_connect(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """None when a TCP connection to host:port opens within `timeout`, else why not."""
    try:
        address = resolve(host, port, timeout)[0]
        with socket.create_connection((address, port), timeout=timeout):
            return None
    except OSError as exc:
        return _why(exc)


def download_hosts(name: str) -> list[tuple[str, int]]:
    """(host, port) of each URL torchvision downloads dataset `name` from."""
    cls = torchvision_class(name)
    urls = getattr(cls, "mirrors", None) or [cls.url]
    parsed = [urlparse(u) for u in urls]
    return list(dict.fromkeys((u.hostname, u.port or (443 if u.scheme == "https" else 80))
                              for u in parsed if u.hostname))


def _can_bind(address: str) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, 0))
            return True
        except OSError:
            return False


def _why(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return exc.strerror or str(exc)
    if isinstance(exc, (TimeoutError, socket.timeout)) and not str(exc):
        return f"no answer within {CONNECT_TIMEOUT_S:.0f} s"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- allreduce -------------------------------------------------------------------------------


def time_allreduce(backend: str, device: str, nbytes: int, timeout: float,
                   world_size: int = 2) -> float:
    """Seconds per all_reduce of `nbytes` of float32 between `world_size` spawned processes
    (median over ALLREDUCE_REPEATS, the slowest rank's); RuntimeError/TimeoutError when it fails
    or takes longer than `timeout` seconds in all. The processes never outlive the call."""
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_allreduce_worker, daemon=True,
                         args=(rank, world_size, port, backend, device, nbytes, results))
             for rank in range(world_size)]
    for p in procs:
        p.start()
    done = False
    try:
        seconds = _collect(procs, results, time.monotonic() + timeout, timeout)
        done = True
        return seconds
    finally:
        for p in procs:
            p.join(timeout=5 if done else 0)  # after a failure the others may wait forever
            if p.is_alive():
                p.kill()
                p.join()


def _collect(procs: list, results, deadline: float, timeout: float) -> float:
    seconds: dict[int, float] = {}
    while len(seconds) < len(procs):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no result within {timeout:.0f} s")
        try:
            rank, ok, value = results.get(timeout=0.5)
        except queue.Empty:
            dead = [(r, p.exitcode) for r, p in enumerate(procs)
                    if r not in seconds and p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"process {dead[0][0]} died (exit code {dead[0][1]})") from None
            continue
        if not ok:
            raise RuntimeError(f"rank {rank}: {value}")
        seconds[rank] = value
    return seconds[0]


def _allreduce_worker(rank: int, world_size: int, port: int, backend: str, device: str,
                      nbytes: int, results) -> None:
    try:
        results.put((rank, True, _timed_allreduce(rank, world_size, port, backend, device,
                                                  nbytes)))
    except Exception as exc:  # noqa: BLE001 - handed to the parent, which reports it
        lines = str(exc).strip().splitlines()
        results.put((rank, False, f"{type(exc).__name__}: {lines[0] if lines else ''}"))


def _timed_allreduce(rank: int, world_size: int, port: int, backend: str, device_kind: str,
                     nbytes: int) -> float:
    from train.bench.comm import (
        time_collective,  # the benchmark's timer: barrier, median, slowest rank
    )

    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if device_kind == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=30))
    try:
        # A wrong sum would be a broken transport: check the values, not only that it returns.
        probe = torch.full((8,), float(rank + 1), device=device)
        dist.all_reduce(probe)
        expected = world_size * (world_size + 1) / 2
        if not bool((probe == expected).all()):
            raise RuntimeError(f"all_reduce summed to {probe[0].item()}, expected {expected}")
        data = torch.zeros(nbytes // 4, device=device)
        return time_collective(lambda: dist.all_reduce(data), device, ALLREDUCE_REPEATS)
    finally:
        dist.destroy_process_group()


# --- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        job = plan_job(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"doctor: {describe(job)}", flush=True)
    width = max(len(name) for name, _ in CHECKS)
    print(f"{'check':<{width}} | verdict | detail", flush=True)
    verdicts = []
    for name, fn in CHECKS:
        verdict, detail = run_check(fn, job)
        verdicts.append(verdict)
        print(f"{name:<{width}} | {verdict:<7} | {detail}", flush=True)
    problems, warnings = verdicts.count(FAIL), verdicts.count(WARN)
    if problems:
        print(f"doctor: {problems} problem(s) would stop the job")
        return 1
    print("doctor: ready to launch" + (f" ({warnings} warning(s))" if warnings else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
