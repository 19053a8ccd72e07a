"""Facts about this machine that the launcher, the workers and the tools decide alike.

No `import torch` at module level: workers install the parent-death signal from here before
anything slow is imported.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

from common.errors import UserError

# Set by the launcher for the workers of an elastic job (`--nnodes MIN:MAX`, as "MIN:MAX"):
# they resume a checkpoint of another world size without checkpoint.allow_changes.
ELASTIC_ENV = "DPTRAIN_ELASTIC"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which SLURM and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def threads_per_worker(requested: int, workers_on_node: int) -> int:
    """Intra-op threads of one CPU worker: `dist.cpu_threads`, or the node's usable cores
    shared evenly by its workers (oversubscribing cores made every step slower here)."""
    return requested or max(1, usable_cores() // max(1, workers_on_node))


# glibc's mallopt parameters, and the most its mmap threshold may be on 64-bit systems.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 << 20
MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
MALLOC_TUNABLES = ("glibc.malloc.trim_threshold", "glibc.malloc.mmap_threshold")


def keep_freed_memory(megabytes: int) -> bool:
    """Let glibc's malloc keep up to `megabytes` of freed heap memory for the next step
    (`dist.cpu_malloc_keep_mb`), and serve blocks up to 32 MiB from that heap.

    By default glibc gives freed memory at the top of its heap back to the OS once more than
    128 KiB of it are free, and maps every block over 128 KiB anew; it raises both limits only
    after it frees such a mapped block (to about its size, 32 MiB at most). A CPU step's
    tensors are freed at the step's end, so a process that had not happened to free a large
    block took every step's memory from the OS again: 6,000 page faults and 10% of a LeNet
    step here. Returns whether the limits were set; not
    with 0, off glibc, or where the user set them (MALLOC_TRIM_THRESHOLD_, GLIBC_TUNABLES).
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (megabytes <= 0 or any(name in os.environ for name in MALLOC_ENV)
            or any(name in tunables for name in MALLOC_TUNABLES)):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc's; absent on macOS, musl
    if mallopt is None:
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, min(megabytes << 20, 2**31 - 1))  # a C int
                and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX))


def visible_gpus() -> int:
    """CUDA devices this process sees (CUDA_VISIBLE_DEVICES applied); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_of_worker(local_rank: int, workers_on_node: int, backend: str) -> int:
    """The GPU a CUDA worker uses, the one policy for launcher and workers.

    NCCL: one GPU per worker (NCCL refuses two ranks on one GPU), so more workers than GPUs
    is an error. gloo: the workers share the GPUs round robin (local rank mod GPUs), so that
    ONE GPU can run several workers and the multi-rank CUDA paths (placement, checkpoint
    gathers, resume) can be exercised on a machine with a single GPU.
    """
    gpus = visible_gpus()
    if backend != "gloo" and workers_on_node > gpus:
        raise UserError(f"{workers_on_node} workers on this node but only {gpus} GPU(s) are "
                        f"visible; NCCL runs one worker per GPU: start at most {gpus} (--gpus / "
                        f"GPUS), or let workers share GPUs with dist.backend=gloo")
    return local_rank % gpus


def resolve_device_kind(requested: str) -> str:
    """'cuda' or 'cpu' for a `dist.device` setting, checking that cuda exists when asked."""
    if requested == "cpu":
        return "cpu"
    if requested == "cuda" and visible_gpus() == 0:
        raise UserError("dist.device=cuda but no GPU is visible (CUDA_VISIBLE_DEVICES, drivers?)")
    return "cuda" if visible_gpus() > 0 else "cpu"


def backend_for(device_kind: str, requested: str = "auto") -> str:
    """The process-group backend: nccl for CUDA workers, gloo for CPU ones, unless asked."""
    if requested != "auto":
        if requested == "nccl" and device_kind != "cuda":
            raise UserError("dist.backend=nccl needs GPUs; CPU workers use gloo")
        return requested
    return "nccl" if device_kind == "cuda" else "gloo"


def die_with_parent(parent: int | None = None,
                    death: signal.Signals = signal.SIGTERM) -> None:
    """Linux: get `death` when the parent (torchrun's agent, the launcher) dies, instead of
    living on as an orphan that holds a GPU. torchrun does not ask for this itself.

    The signal only covers a parent that dies after this call; `parent` (the pid the process
    was started by) catches one that died before: then this process exits at once. (Linux
    sends it when the parent's thread that started this process ends: start it from the
    parent's main thread.)
    """
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, death)
    if parent is not None and os.getppid() != parent:
        os._exit(128 + death)


_at_leave: list[Callable[[], None]] = []


def at_leave(fn: Callable[[], None]) -> None:
    """A quick cleanup that runs however this process leaves through `leave`, even without
    its exit functions (a failure, a stop signal), and at a normal exit."""
    _at_leave.append(fn)
    atexit.register(fn)


def run_leave_functions() -> None:
    """Run the `at_leave` cleanups now, newest first, each once (a process forked from a
    server ends with `os._exit` after its function: common/spawn.py calls this first)."""
    while _at_leave:
        fn = _at_leave.pop()
        atexit.unregister(fn)
        with contextlib.suppress(Exception):
            fn()


def pause_collector() -> None:
    """Before a command's heavy imports (torch, torch._dynamo): Python's cyclic garbage
    collector would walk the objects they make (about 330,000) again and again while they
    are made, 0.28 s of the 1.9 s of CPU that importing both takes here. Until
    `resume_collector`; only where a command starts (`if __name__ == "__main__"`)."""
    gc.disable()


def resume_collector() -> None:
    """After those imports: what they made lives until the process ends, so it leaves the
    collector's view for good (`gc.freeze`; the import's own garbage, about 9,000 small
    objects, stays with it), and collection goes on as usual for whatever comes next."""
    gc.freeze()
    gc.enable()


def in_forkserver() -> bool:
    """This interpreter is a multiprocessing forkserver (`python -c 'from
    multiprocessing.forkserver import main; ...'`) importing its preload list."""
    return sys.argv[:1] == ["-c"] and "multiprocessing.forkserver" in sys.modules


def leave(code: int, exit_functions: bool = True) -> NoReturn:
    """End this process with `code`, without the interpreter's teardown of every module and
    object: with torch loaded that takes about a second per process, and nothing is left to
    do by then. `exit_functions`: run the atexit functions first (log handlers, the stack-dump
    file, loader processes, wandb's service), as a normal exit would; the `at_leave` ones run
    in any case."""
    if exit_functions:
        atexit._run_exitfuncs()  # the `at_leave` ones among them
    else:
        run_leave_functions()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
