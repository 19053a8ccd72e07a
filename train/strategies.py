"""How gradients are synchronized: the only thing that differs between the training paths.

A strategy wraps the model for training, performs the gradient sync after backward (or lets
the wrapper do it), and unwraps for evaluation and saving. Data, model, loop, metrics and
checkpoints are the same code for every strategy, so comparisons between paths are fair.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from train.dist import DistContext


class Single:
    """One process, one device: no synchronization at all (the reference for parity tests)."""

    name = "single"

    def __init__(self, ctx: DistContext):
        self.ctx = ctx

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def sync_gradients(self, model: nn.Module) -> None:
        """Called after every backward; wrappers that sync inside backward do nothing here."""

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        yield

    def sync_buffers(self, model: nn.Module) -> None:
        """Make every rank's buffers (BatchNorm statistics) rank 0's, before evaluating."""


class DDP(Single):
    """DistributedDataParallel: bucketed gradient allreduce overlapped with backward."""

    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module

    def no_sync(self, model: nn.Module):
        return model.no_sync()

    def sync_buffers(self, model: nn.Module) -> None:
        # DDP broadcasts buffers at the start of each training forward, and the forward then
        # updates them with the local batch; after the last step ranks differ slightly.
        for buffer in self.unwrap(model).buffers():
            dist.broadcast(buffer, src=0)


def make_strategy(mode: str, ctx: DistContext) -> Single:
    if not ctx.distributed:
        return Single(ctx)
    return {"ddp": DDP}[mode](ctx)
