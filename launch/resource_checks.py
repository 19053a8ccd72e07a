"""Checks of what the workers would need from the machine: the model's published weights
(model.pretrained=true) and the CPU cores the workers share.

Like launch/checks.py's, each takes the `Job` and returns (verdict, detail); with `job.dry`
(the doctor) nothing is downloaded.
"""

from __future__ import annotations

import urllib.request
from urllib.parse import urlparse

from common.errors import UserError
from common.host import threads_per_worker, usable_cores
from launch.job import Job
from launch.net import try_connect
from launch.verdict import OK, SKIP, WARN, Verdict


def check_pretrained(job: Job) -> Verdict:
    """model.pretrained=true: torchvision's weights in the torch hub cache, or downloaded there
    now by the launcher (once, before workers start: not by every worker at once)."""
    model = job.cfg.model
    if not model.pretrained:
        return SKIP, "model.pretrained=false: no published weights needed"
    from models.catalog import TIMM, TORCHVISION, check_name

    check_name(model.name)
    if not model.name.startswith((TORCHVISION, TIMM)):
        raise UserError(f"model.pretrained=true: {model.name} has no published weights; use "
                        f"model.init_from=<file> instead")
    if model.name.startswith(TIMM):
        return WARN, (f"{model.name}: timm fetches its weights itself in each worker (not "
                      f"checked here)")
    from models.pretrained import fetch_published, weights_file

    name, url, path = weights_file(model.name[len(TORCHVISION):])
    if path.is_file():
        return OK, f"{name}: {path}"
    if not job.dry:
        return OK, f"{name}: downloaded into {fetch_published(model.name[len(TORCHVISION):])}"
    host, port = _via_proxy(url)
    error = try_connect(host, port)
    if error is None:
        return WARN, f"{name} missing from {path}: the launch downloads it from {host}"
    raise UserError(f"model.pretrained=true: torchvision's {name} weights are not in the torch "
                    f"hub cache ({path}) and {host} does not answer ({error}); put the file "
                    f"there, or use model.init_from=<file>")


def _via_proxy(url: str) -> tuple[str, int]:
    """Where a download of `url` connects: the proxy the environment names, else the host."""
    parsed = urlparse(url)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    target = urlparse(proxy if "://" in (proxy or "") else f"http://{proxy}") if proxy \
        else parsed
    default = 443 if target.scheme == "https" else 80
    return target.hostname or "", target.port or default


def check_cores(job: Job) -> Verdict:
    """CPU workers whose threads outnumber the node's usable cores take turns on them."""
    if job.kind != "cpu" or job.dp:
        return SKIP, "GPU workers (or mode dp: one process): cores are not shared between workers"
    cores, workers = usable_cores(), job.nproc
    threads = threads_per_worker(job.cfg.dist.cpu_threads, workers)
    if workers * threads <= cores:
        return OK, f"{workers} worker(s) x {threads} thread(s) on {cores} usable core(s)"
    fit = max(1, cores // threads)
    return WARN, (f"{workers} CPU worker(s) x {threads} thread(s) on {cores} usable core(s): "
                  f"the workers take turns on the cores, so each step takes at least "
                  f"{workers * threads / cores:.1f}x the compute time it would with every "
                  f"thread on a core of its own, and each collective waits for the worker "
                  f"that is not running; {fit} worker(s) (GPUS={fit}) fit the cores")
