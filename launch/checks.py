"""The checks before launch, each answered once: the launcher stops at the first FAIL
(launch/plan.py), the doctor shows every one as a row (launch/doctor.py).

A check takes the `Job` (launch/job.py: what would be started) and returns (verdict, detail);
a UserError raised inside is a FAIL with its message. With `job.dry` (the doctor) checks
change nothing: no download, no folder created.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlparse

from common.errors import UserError
from common.files import why_not_writable
from common.host import backend_for, visible_gpus
from launch.job import Job
from launch.net import try_connect
from train.data import DOWNLOADABLE, ensure_available, torchvision_class
from train.identity import check_run_dir
from train.observe.wandb_sink import credentials, resolve_mode
from train.preflight import check_device_options, check_mixing, check_recipe, check_world_size

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"
Verdict = tuple[str, str]
DISK_FAIL_BYTES = 200 * 2**20
DISK_WARN_BYTES = 2 * 2**30


def run_check(fn: Callable[[Job], Verdict], job: Job, raise_errors: bool = False) -> Verdict:
    """One check's verdict; a UserError is a FAIL, and a broken check is reported (the doctor)
    or raised (the launcher, `raise_errors`)."""
    try:
        return fn(job)
    except UserError as exc:
        return FAIL, str(exc)
    except Exception as exc:
        if raise_errors:
            raise
        return FAIL, f"the check itself failed: {type(exc).__name__}: {exc}"


# --- the checks -------------------------------------------------------------------------------


def check_gpus(job: Job) -> Verdict:
    if job.problem:
        return FAIL, job.problem
    if job.kind == "cuda":
        import torch

        names = sorted({torch.cuda.get_device_name(i) for i in range(visible_gpus())})
        return OK, f"{job.note}: {', '.join(names)}"
    return OK, job.note


def check_options(job: Job) -> Verdict:
    """Options the device cannot run, and launcher flags that contradict the mode."""
    problems, warnings = [], []
    try:
        warnings = check_device_options(job.cfg, job.kind)
        check_recipe(job.cfg)
    except UserError as exc:
        problems.append(str(exc))
    restarts = job.args.max_restarts
    if restarts < 0:
        problems.append(f"--max-restarts must not be negative; got {restarts}")
    if job.dp and job.args.nnodes > 1:
        problems.append("mode dp runs one process on one node; several nodes need mode ddp or "
                        "scratch")
    elif job.dp and restarts > 0:
        problems.append(f"--max-restarts {restarts} needs torchrun workers (mode ddp or "
                        f"scratch); mode dp runs one process without torchrun, which nothing "
                        f"restarts")
    if problems:
        return FAIL, "; ".join(problems)
    if warnings:
        return WARN, "; ".join(warnings)
    return OK, f"precision {job.cfg.perf.precision}, up to {restarts} restart(s)"


def check_backend(job: Job) -> Verdict:
    import torch
    import torch.distributed as dist

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


def check_batch(job: Job) -> Verdict:
    check_world_size(job.cfg, job.world_size)
    check_mixing(job.cfg, job.world_size)
    batch, accum = job.cfg.train.batch_size, job.cfg.train.grad_accum_steps
    split = f" in {accum} micro-batches" if accum > 1 else ""
    if job.dp:
        return OK, f"mode dp: one process takes the global batch {batch}{split}"
    return OK, (f"global batch {batch} = {job.world_size} worker(s) x "
                f"{batch // job.world_size} per worker{split}")


def check_port(job: Job) -> Verdict:
    """The rendezvous: node 0's port free, several nodes given node 0's address."""
    if job.dp:
        return SKIP, "mode dp: one process, no rendezvous"
    if job.args.nnodes > 1 and not job.args.master_addr:
        return FAIL, ("several nodes need --master-addr (MASTER_ADDR): the address of node 0, "
                      "reachable from every node")
    if job.args.nnodes == 1 and job.args.master_port is None:
        return OK, "single node: a free port is picked at launch"
    if job.args.nnodes > 1 and job.args.node_rank > 0:
        return SKIP, f"node 0 hosts the rendezvous on port {job.master_port}"
    require_free_port(job.master_port)
    return OK, f"port {job.master_port} is free on this node"


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


def check_dataset(job: Job) -> Verdict:
    """Files present and readable (every node reads its own copy), else downloaded now; image
    folders laid out right; a data.factory that imports and gives (image, label) pairs. The
    doctor only looks, and says whether a download host answers."""
    data = job.cfg.data
    try:
        return OK, ensure_available(replace(data, download=data.download and not job.dry))
    except UserError as missing:
        if not job.dry or data.name not in DOWNLOADABLE:
            raise
        if not data.download:
            return FAIL, f"{missing} (data.download=false)"
        errors = []
        for host, port in download_hosts(data.name):
            error = try_connect(host, port)
            if error is None:
                return WARN, (f"missing: will be downloaded into data.root ({data.root}) from "
                              f"{host}")
            errors.append(f"{host}: {error}")
        return FAIL, f"{missing}; no download host answers ({'; '.join(errors)})"


def download_hosts(name: str) -> list[tuple[str, int]]:
    """(host, port) of each URL torchvision downloads dataset `name` from."""
    cls = torchvision_class(name)
    urls = getattr(cls, "mirrors", None) or [cls.url]
    parsed = [urlparse(u) for u in urls]
    return list(dict.fromkeys((u.hostname, u.port or (443 if u.scheme == "https" else 80))
                              for u in parsed if u.hostname))


def check_wandb(job: Job) -> Verdict:
    if job.args.node_rank > 0:
        return SKIP, "only the main worker (on node 0) logs to wandb"
    cfg = job.cfg
    mode, why = resolve_mode(cfg.wandb)
    if mode == "disabled":
        return OK, "disabled (wandb.mode=disabled): nothing is logged to wandb"
    if importlib.util.find_spec("wandb") is None:
        return FAIL, (f"wandb.mode={cfg.wandb.mode} but the wandb package is not installed; "
                      f"set wandb.mode=disabled")
    found = credentials()
    if mode == "online" and not found:
        return FAIL, ("wandb.mode=online but no credentials: set WANDB_API_KEY or run `wandb "
                      "login`, or use wandb.mode=offline and `wandb sync` later")
    if mode == "offline":
        reason = why if cfg.wandb.mode == "offline" else "no credentials"
        return OK, (f"offline ({reason}): runs are written under {cfg.run.dir}/wandb, upload "
                    f"with `wandb sync`")
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    if job.dry:
        error = try_connect(url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
        if error:
            return WARN, (f"online ({found}), but {url.hostname} does not answer ({error}); "
                          f"wandb.mode=offline logs into run.dir/wandb for a later `wandb sync`")
    return OK, f"online ({found}), project {cfg.wandb.project}"


def check_disk(job: Job) -> Verdict:
    existing = nearest_existing(Path(job.cfg.run.dir))
    free = shutil.disk_usage(existing).free
    detail = f"{free / 2**30:.1f} GiB free on the file system of {existing}"
    if free < DISK_FAIL_BYTES:
        return FAIL, f"{detail}: checkpoints and metrics need more"
    if free < DISK_WARN_BYTES:
        return WARN, f"{detail}: checkpoints of larger models may not fit"
    return OK, detail


def check_run_folder(job: Job) -> Verdict:
    """The same run resumes, a different one is refused (or replaced), the folder writable."""
    from train.checkpoint import Checkpoints  # late: it imports torch

    if job.args.node_rank > 0:
        return SKIP, "node 0 checks it (run.dir should be on a file system all nodes share)"
    cfg, folder = job.cfg, Path(job.cfg.run.dir)
    why = why_not_writable(folder)
    if why:
        return FAIL, f"run.dir {folder} cannot be created or written: {why}"
    if check_run_dir(cfg):
        return WARN, f"run.overwrite=true: the different run in {folder} will be deleted"
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


CHECKS: dict[str, Callable[[Job], Verdict]] = {
    "GPUs": check_gpus,
    "device options": check_options,
    "backend": check_backend,
    "rendezvous port": check_port,
    "dataset": check_dataset,
    "batch": check_batch,
    "wandb": check_wandb,
    "disk": check_disk,
    "run folder": check_run_folder,
}
