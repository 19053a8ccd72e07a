"""The checks before launch, each answered once: the launcher stops at the first FAIL
(launch/plan.py), the doctor shows every one as a row (launch/doctor.py).

A check takes the `Job` (launch/job.py: what would be started) and returns (verdict, detail);
a UserError raised inside is a FAIL with its message. With `job.dry` (the doctor) checks
change nothing: no download, no folder created. The config's own rows are the sections of
common/validate.py, which every worker runs again.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import replace
from urllib.parse import urlparse

from common.errors import UserError
from common.host import backend_for, visible_gpus
from common.run_length import known_steps_per_epoch, profile_range
from common.validate import SECTIONS, validate
from launch.folder_checks import check_disk, check_run_folder
from launch.gpu_stack import driver_behind
from launch.job import Job
from launch.net import try_connect
from launch.resource_checks import check_cores, check_pretrained
from launch.verdict import FAIL, OK, SKIP, WARN, Verdict
from train.data import DOWNLOADABLE, SmallerThanBatch, ensure_available, torchvision_class
from train.model import load_state_dict_file
from train.observe.wandb_sink import check_usable, credentials, resolve_mode


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
        behind = driver_behind() if job.dry else None  # the doctor: nvidia-smi asked
        if behind:
            return WARN, f"{job.note}: {', '.join(names)}; {behind}"
        return OK, f"{job.note}: {', '.join(names)}"
    return OK, job.note


def config_row(section: str) -> Callable[[Job], Verdict]:
    """The row of one section of common/validate.py: its first problem (a FAIL), its warnings
    (a WARN), or what it found."""
    def check(job: Job) -> Verdict:
        warnings = validate(job.cfg, job.world, only=(section,))
        if warnings:
            return WARN, "; ".join(warnings)
        return SUMMARIES[section](job)

    check.__name__ = check.__qualname__ = f"check_{section.replace(' ', '_')}"
    return check


def check_restarts(job: Job) -> Verdict:
    """Launcher flags that contradict the mode or the nodes."""
    restarts = job.args.max_restarts
    if restarts < 0:
        return FAIL, f"--max-restarts must not be negative; got {restarts}"
    if job.dp and restarts > 0:
        return FAIL, (f"--max-restarts {restarts} needs torchrun workers (mode ddp or scratch); "
                      f"mode dp runs one process without torchrun, which nothing restarts")
    if job.nodes.elastic and restarts == 0 and not job.dp:
        # torchrun counts a node that leaves as a failure of the group (one restart each);
        # a node that joins costs none.
        return WARN, (f"--nnodes {job.nodes} with --max-restarts 0: the first node that leaves "
                      f"ends the job; give --max-restarts K to outlive K departures")
    return OK, f"up to {restarts} restart(s)"


def check_initial_weights(job: Job) -> Verdict:
    """model.init_from: a state dict torch loads (the workers check that it fits the model)."""
    path = job.cfg.model.init_from
    if not path:
        return SKIP, "no model.init_from: the model starts from its own initialization"
    return OK, f"{len(load_state_dict_file(path))} tensors in {path}"


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


def _batch_split(job: Job) -> Verdict:
    batch, accum = job.cfg.train.batch_size, job.cfg.train.grad_accum_steps
    split = f" in {accum} micro-batches" if accum > 1 else ""
    if job.dp:
        return OK, f"mode dp: one process takes the global batch {batch}{split}"
    return OK, "; ".join(f"global batch {batch} = {size} worker(s) x {batch // size} per "
                         f"worker{split}" for size in job.world.sizes)


def _profiled_steps(job: Job) -> Verdict:
    if not job.cfg.perf.profile_steps:
        return SKIP, "no profile asked (perf.profile_steps)"
    first, last = profile_range(job.cfg.perf.profile_steps)
    return OK, (f"steps {first}-{last} are traced on every rank into "
                f"{job.cfg.run.dir}/profile/")


def _schedule(job: Job) -> Verdict:
    optim = job.cfg.optim
    warmup = (f"{optim.warmup_steps} warmup steps" if optim.warmup_steps else
              f"{optim.warmup_epochs:g} warmup epochs" if optim.warmup_epochs else "no warmup")
    then = {"step": f"step at epochs {optim.milestones}"}.get(optim.schedule, optim.schedule)
    per_epoch = known_steps_per_epoch(job.cfg)
    inside = (f"{job.cfg.train.epochs} epoch(s) of {per_epoch} steps" if per_epoch else
              f"train.epochs={job.cfg.train.epochs} (checked again with the data's steps)")
    return OK, f"{warmup}, then {then}, inside the run's {inside}"


def _recipe(job: Job) -> Verdict:
    cfg = job.cfg
    return OK, f"model {cfg.model.name}, optimizer {cfg.optim.name}, data {cfg.data.name}"


# What each section of common/validate.py found, once it passed.
SUMMARIES: dict[str, Callable[[Job], Verdict]] = {
    "recipe": _recipe,
    "device options": lambda job: (OK, f"precision {job.cfg.perf.precision}"),
    "batch": _batch_split,
    "schedule": _schedule,
    "profile": _profiled_steps,
}


def check_port(job: Job) -> Verdict:
    """The rendezvous: node 0's port free, several nodes given node 0's address."""
    if job.dp:
        return SKIP, "mode dp: one process, no rendezvous"
    several = job.nodes.several
    if several and not job.args.master_addr:
        return FAIL, ("several nodes need --master-addr (MASTER_ADDR): the address of node 0, "
                      "reachable from every node")
    if not several and job.args.master_port is None:
        return OK, "single node: a free port is picked at launch"
    if several and job.args.node_rank > 0:
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
        return OK, ensure_available(replace(data, download=data.download and not job.dry),
                                    job.cfg.train.batch_size)
    except SmallerThanBatch:
        raise  # the files are there: nothing a download would change
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
        return OK, f"disabled ({why}): nothing is logged to wandb"
    try:
        check_usable(cfg.wandb)
    except UserError as exc:
        return FAIL, str(exc)
    found = credentials()
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


CHECKS: dict[str, Callable[[Job], Verdict]] = {
    "GPUs": check_gpus,
    **{section: config_row(section) for section in SECTIONS},  # common/validate.py's
    "restarts": check_restarts,
    "initial weights": check_initial_weights,
    "backend": check_backend,
    "rendezvous port": check_port,
    "dataset": check_dataset,
    "wandb": check_wandb,
    "disk": check_disk,
    "run folder": check_run_folder,
    "pretrained weights": check_pretrained,
    "cores": check_cores,
}
check_batch = CHECKS["batch"]  # the batch row alone: every world size of an elastic range
