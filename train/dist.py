"""Distributed facts, decided once: which rank, which device, which backend.

The backend follows the device (nccl for cuda, gloo for cpu), so a CPU run executes the very
code a GPU run does. A plain `python -m train` (no torchrun) is world_size=1, is_main=True.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from common.errors import PeerFailed, UserError
from common.host import (
    backend_for,
    gpu_of_worker,
    keep_freed_memory,
    resolve_device_kind,
    threads_per_worker,
)
from common.schema import DistConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str  # "nccl", "gloo", or "none" for a single process without a process group
    cpu_threads: int  # torch intra-op threads of this worker (CPU runs)
    store: Any = field(default=None, compare=False, repr=False)  # the rendezvous key-value store

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend != "none"


def setup(cfg: DistConfig) -> DistContext:
    """Read torchrun's environment, pick this worker's device, and join the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))

    kind = resolve_device_kind(cfg.device)
    backend = backend_for(kind, cfg.backend) if launched else "none"
    if kind == "cuda":
        # Checked on every rank alike (not `local_rank >= count`), so all agree on the error.
        device = torch.device("cuda", gpu_of_worker(local_rank, local_world_size, backend))
        torch.cuda.set_device(device)
        threads = torch.get_num_threads()
    else:
        device = torch.device("cpu")
        threads = threads_per_worker(cfg.cpu_threads, local_world_size)
        torch.set_num_threads(threads)
        # Tiny weights and gradients (LeNet's N(0, 0.01) init, late cosine steps) produce
        # denormal floats, which x86 CPUs process in microcode: steps were 3.5x slower here.
        torch.set_flush_denormal(cfg.cpu_flush_denormal)
        # Without it, each step took its tensors' memory from the OS anew (page faults).
        keep_freed_memory(cfg.cpu_malloc_keep_mb)

    store = None
    if launched:
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        store = _store(rank, world_size, timeout)
        # NCCL bound to this worker's GPU starts its communicator now (eager), so that the
        # first collective does not pay for it, and nothing guesses the GPU from the rank.
        dist.init_process_group(
            backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
            device_id=device if backend == "nccl" else None,
        )
    return DistContext(rank, local_rank, world_size if launched else 1,
                       local_world_size if launched else 1, device, backend, threads, store)


def _store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store torchrun points at, with a key prefix per restart attempt.

    torchrun's agent keeps one store for all restarts of the worker group; restarted workers
    would read the dead ones' gloo/NCCL addresses from it and fail to connect.
    """
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not agent_hosts_it, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"dptrain/attempt_{attempt}/", store)


def teardown(ctx: DistContext | None) -> None:
    """Leave the process group once nothing uses it any more.

    Collect garbage first: a DDP wrapper caught in a reference cycle keeps the gloo process
    group alive past interpreter shutdown, where its worker threads abort the process
    ("terminate called without an active exception").
    """
    if ctx is not None and ctx.distributed and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def agree(ctx: DistContext, fn: Callable[[], T]) -> T:
    """Run `fn` on every rank; if it raised UserError anywhere, raise it everywhere (as the
    same kind of UserError, so that every rank exits with its exit code).

    Setup steps (run folder, dataset files) can fail on some ranks only, and a checkpoint write
    on the main rank only; without agreeing, the healthy ranks would wait forever in their next
    collective.
    """
    result, error, bug = None, None, None
    try:
        result = fn()
    except UserError as exc:
        error = (type(exc), str(exc))
    except Exception as exc:
        if not ctx.distributed:
            raise
        # A bug of ours (what comes from outside is translated where it is called): one
        # traceback, from this rank, printed before the others learn of it and leave.
        print(f"[rank {ctx.rank}] {traceback.format_exc()}", file=sys.stderr, end="",
              flush=True)
        bug, error = exc, (Reported, f"{type(exc).__name__}: {exc}")
    if ctx.distributed:
        errors: list[tuple[type[UserError], str] | None] = [None] * ctx.world_size
        dist.all_gather_object(errors, error)
        failed = [(rank, e) for rank, e in enumerate(errors) if e]
        if failed:
            rank, (kind, msg) = failed[0]
            if kind is Reported:
                raise Reported(rank, msg) from bug
            same = all(m == msg for _, (_, m) in failed)
            raise kind(msg if same else f"[rank {rank}] {msg}", agreed=True)
    elif error:
        raise error[0](error[1])
    return result  # type: ignore[return-value]


class Reported(PeerFailed):
    """A bug on some rank during an agreed step: that rank printed its traceback, every rank
    exits with 1 and says nothing more (no traceback per rank)."""

    def __init__(self, rank: int, message: str):
        super().__init__(rank, message, 1)


def from_main(ctx: DistContext, fn: Callable[[], T]) -> T:
    """Run `fn` on the main rank only; every rank gets its result, or raises its UserError."""
    outcome: list = [None]
    if ctx.is_main:
        try:
            outcome[0] = (fn(), None)
        except UserError as exc:
            outcome[0] = (None, (type(exc), str(exc)))
    if ctx.distributed:
        dist.broadcast_object_list(outcome, src=0)
    result, error = outcome[0]
    if error:
        raise error[0](error[1], agreed=ctx.distributed)
    return result


@contextlib.contextmanager
def local_main_first(ctx: DistContext) -> Iterator[None]:
    """The body runs on each node's local rank 0 first, then on the node's other ranks
    (Accelerate's `main_process_first`): one process per node downloads, the others then read
    what it wrote. A UserError in either turn is raised on every rank, so none waits alone."""
    first = ctx.local_rank == 0
    failed: Exception | None = None
    if not first:
        agree(ctx, _nothing)  # turn 1: wait for local rank 0
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - agreed below: a UserError's line, or a bug's traceback
        failed = exc
    agree(ctx, lambda: _raise(failed))  # local rank 0: the end of turn 1; others: of turn 2
    if first:
        agree(ctx, _nothing)  # turn 2: the other ranks


def _nothing() -> None:
    return None


def _raise(error: Exception | None) -> None:
    if error is not None:
        raise error


_FAILED_KEY = "failed_first"


def publish_failure(ctx: DistContext | None, message: str, exit_code: int) -> None:
    """Tell the other workers that this one stops with an error it reports itself (a file
    that cannot be decoded, found by one rank): their collectives then fail, and they stay
    quiet instead of each blaming a dead peer."""
    if ctx is None or ctx.store is None:
        return
    try:
        ctx.store.set(_FAILED_KEY, f"{ctx.rank}\n{exit_code}\n{message}")
    except Exception:  # noqa: BLE001 - the store may be gone; the others then say more
        pass


def peer_failure(ctx: DistContext) -> tuple[int, int, str] | None:
    """(rank, exit code, message) of a worker that published its failure, if one did."""
    if ctx.store is None:
        return None
    try:
        if not ctx.store.check([_FAILED_KEY]):
            return None
        rank, code, message = ctx.store.get(_FAILED_KEY).decode().split("\n", 2)
    except Exception:  # noqa: BLE001 - the store lived in the failed worker: nothing known
        return None
    return int(rank), int(code), message


_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def is_comm_failure(exc: BaseException) -> bool:
    """A collective that timed out or lost its peers (gloo raises; NCCL's watchdog aborts)."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or any(
        s in text for s in ("Timed out", "timed out", *_GONE))


def peer_went_away(exc: BaseException) -> bool:
    """The collective failed because a peer's connection closed (it exited or was killed), not
    because the wait ran out."""
    return any(s in str(exc) for s in _GONE)
