"""How gradients are synchronized: the only thing that differs between the training paths.

A strategy wraps the model for training, performs the gradient sync after backward (or lets
the wrapper do it inside backward), and unwraps for evaluation and saving. Data, model, loop,
metrics and checkpoints are the same code for every strategy, so comparisons are fair. One
file per strategy; `make_strategy` (train/strategies/__init__.py) picks one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from train.dist import DistContext
from train.optim import PlainHooks

if TYPE_CHECKING:
    from train.data.batches import Batches

Batch = tuple[torch.Tensor, torch.Tensor]
ALIGN = 16  # bytes: each tensor's slice of the packed buffer can be viewed in its own dtype


def broadcast_together(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Make `tensors` (of any dtypes, on one device) rank `src`'s with ONE broadcast: their
    bytes packed into one flat buffer. One per dtype or per tensor would cost a collective's
    latency each (ResNet-50 has ~160 buffers)."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return
    nbytes = [t.numel() * t.element_size() for t in tensors]
    flat = torch.empty(sum(-(-n // ALIGN) * ALIGN for n in nbytes), dtype=torch.uint8,
                       device=tensors[0].device)
    views, offset = [], 0
    for t, n in zip(tensors, nbytes, strict=True):
        views.append(flat[offset:offset + n].view(t.dtype).view(t.shape))
        offset += -(-n // ALIGN) * ALIGN
    mine = dist.get_rank() == src
    if mine:
        torch._foreach_copy_(views, tensors)  # one launch per dtype on a GPU, not per tensor
    dist.broadcast(flat, src=src)
    if not mine:
        torch._foreach_copy_(tensors, views)


class Strategy(PlainHooks):
    """The defaults: no synchronization at all (a lone process). How a mode distributes
    gradients and parameters; the optimizer and scaler it builds default to `PlainHooks`'
    (ZeRO and FSDP shard them). The console words it (train/observe/describe.py); known
    failures are translated in train/loop/failures.py; `STRATEGIES` picks one by mode."""

    name = "single"
    sync_method = "none: one process"
    probes_sync = False  # True: the sync hides inside backward and is estimated by a probe
    probe_passes = 0  # forward+backward passes one probe costs (each about a step)
    measures_sync = True  # the loop's timed sync phase is the whole sync (else: n/a, or a probe)

    def __init__(self, ctx: DistContext):
        self.ctx = ctx

    def devices(self) -> list[torch.device]:
        """The devices this process computes on (their peak memory is reported)."""
        return [self.ctx.device]

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def compile(self, model: nn.Module, mode: str, backend: str = "inductor") -> nn.Module:
        """torch.compile around the wrapper: for DDP, dynamo then splits the graph at bucket
        boundaries so that the allreduce still overlaps backward; compiled inside, DDP would
        get every gradient at once at the end of one fused backward. `mode` is inductor's."""
        if backend != "inductor":
            return torch.compile(model, backend=backend)
        return torch.compile(model, mode=mode)

    def eval_model(self, model: nn.Module, plain: nn.Module) -> nn.Module:
        """What evaluation runs: the plain module, so no collective hides in its forward (and
        a compiled model is not recompiled for the evaluation batch sizes)."""
        return plain

    def sync_gradients(self, model: nn.Module) -> None:
        """Called after the last backward of every optimizer step."""

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Around backwards whose gradients are only accumulated (not the step's last)."""
        return contextlib.nullcontext()

    def settle_buckets(self, model: nn.Module, forward_backward: Callable[[], None]) -> None:
        """Before a resumed run's first step: make the gradient sync's layout the one the
        uninterrupted run had at this step (DDP's rebuilt buckets)."""

    def sync_buffers(self, model: nn.Module) -> None:
        """Make every rank's buffers (BatchNorm statistics) rank 0's, before evaluating."""

    def state_dict(self) -> dict[str, Any] | None:
        """This rank's sync state that a checkpoint must carry (a stateful comm hook's)."""
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore what `state_dict` returned on this rank; None: start the state afresh."""

    def probe_sync_ms(self, model: nn.Module, forward_backward: Callable[[], None]) -> float | None:
        """Estimate of the gradient-sync time per step hidden inside backward (None: not needed,
        the loop measures the sync phase directly)."""
        return None

    # --- what the optimizer and the checkpoints see (mode fsdp and ddp.zero shard them) -----

    def eval_batches(self, batches: Batches) -> Iterator[Batch]:
        """What evaluation iterates on this rank: its own batches (counts may differ by one
        between ranks: evaluation runs no collective per batch)."""
        return batches.iterate()

    def checkpoint_parts(self, model: nn.Module, optimizer: torch.optim.Optimizer
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(parts the same on every rank, saved from the main rank; parts in pieces across the
        ranks, each saved by its own rank through torch.distributed.checkpoint)."""
        return {"model": model, "optimizer": optimizer}, {}


class Single(Strategy):
    """One process, one device: no synchronization at all (the reference for parity tests)."""
