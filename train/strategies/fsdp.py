"""FSDP2: parameters, gradients and optimizer state sharded across the ranks.

`torch.distributed.fsdp.fully_shard` on each block of the model and on the root, over a device
mesh of all ranks. Each rank keeps 1/N of every parameter (a DTensor shard along dim 0); a
block's forward all-gathers its parameters and frees them after (`fsdp.reshard_after_forward`),
its backward gathers them again and reduce-scatters the gradients, so each rank ends a step with
the averaged gradient of its own shard only, and the optimizer (built on the shards) keeps
state for that shard only. The update is the same as DDP's: each rank applies SGD to its 1/N of
the same averaged gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from common.schema import FSDPConfig
from train.data.batches import ShardOrder
from train.dist import DistContext
from train.optim import AUTOCAST_DTYPES
from train.strategies.base import Batch, Strategy, broadcast_together


def blocks(model: nn.Module) -> Iterator[nn.Module]:
    """The units FSDP shards one by one: the modules with parameters just below the root,
    looking inside containers (nn.Sequential, nn.ModuleList) rather than sharding them whole.
    LeNet: its two convolutions and two linear layers; the book's ResNet-18: the stem
    convolution and norm, each of its 8 residual blocks, the classifier."""
    for child in model.children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            yield from blocks(child)
        elif any(True for _ in child.parameters()):
            yield child


class FSDP(Strategy):
    """FSDP2 (`fully_shard`): every rank holds 1/N of the parameters, gradients and optimizer
    state; parameters are gathered per block around its forward and backward."""

    name = "fsdp"
    sync_method = ("included in compute: FSDP all-gathers each block's parameters in forward "
                   "and backward and reduce-scatters its gradients in backward")
    # the gradient sync is inside forward and backward; the loop's sync phase holds only the
    # buffers' broadcast
    measures_sync = False

    def __init__(self, ctx: DistContext, cfg: FSDPConfig, precision: str):
        super().__init__(ctx)
        self.cfg = cfg
        # On GPUs bf16/fp16 runs forward and backward on parameters gathered in that dtype
        # (half the all-gather bytes) and reduces gradients in fp32 onto fp32 shards. On the
        # CPU, gloo is left with fp32 and autocast alone lowers the compute, as in every mode.
        self.param_dtype = AUTOCAST_DTYPES.get(precision) if ctx.device.type == "cuda" else None

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.ctx.device.type, (self.ctx.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32
                                      if self.param_dtype else None)
        # FSDP2 shards contiguous parameters only; channels_last convolution weights are not
        # (the inputs stay channels_last, and the convolutions with them).
        for p in model.parameters():
            p.data = p.data.contiguous()
        knobs = {"mesh": mesh, "mp_policy": policy,
                 "reshard_after_forward": self.cfg.reshard_after_forward}
        for block in list(blocks(model)):
            fully_shard(block, **knobs)
        fully_shard(model, **knobs)  # in place: `model` is now the sharded module itself
        self.sync_buffers(model)
        return model

    def sync_gradients(self, model: nn.Module) -> None:
        # As DDP's broadcast_buffers, at step granularity: every step starts from rank 0's
        # buffers (BatchNorm statistics), which FSDP leaves replicated and unsynchronized. Once
        # per optimizer step, not per forward: in training mode a BatchNorm normalizes with the
        # batch's statistics, so its running ones never change what a step computes.
        self.sync_buffers(model)

    def sync_buffers(self, model: nn.Module) -> None:
        broadcast_together(list(model.buffers()))

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        # Accumulating micro-batches: gradients stay unsharded and unreduced until the last.
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def eval_batches(self, batches: ShardOrder) -> Iterator[Batch]:
        """Every rank runs as many forwards as the rank with the most batches: each forward
        all-gathers parameters, so a rank that stopped early would leave the others waiting.
        The extra ones are empty batches (zero samples: nothing counted)."""
        count = torch.tensor([len(batches)], device=self.ctx.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        last = None
        for last in batches.iterate():
            yield last
        missing = int(count.item()) - len(batches)
        if missing:
            # The padding is the last batch cut to zero samples (its shape, dtype and memory
            # format, on either data path; issue 21: the stream path has no `data.images`); a
            # rank without any batch asks its batches for an empty one.
            images, labels = last if last is not None else batches.empty_batch()
            for _ in range(missing):
                yield images[:0], labels[:0]

    def grad_scaler(self, device_type: str, enabled: bool) -> torch.amp.GradScaler:
        # fp16: an inf or NaN may sit in one rank's shard of the gradients only; this scaler
        # all-reduces the finding, so that every rank skips the same steps.
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device_type, enabled=enabled)

    def checkpoint_parts(self, model: nn.Module, optimizer: torch.optim.Optimizer
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
        return {}, {"model": ShardedModel(model, self.cfg.consolidate),
                    "optimizer": ShardedOptimizer(model, optimizer)}


class ShardedModel:
    """The sharded model as a checkpoint part: this rank's shards, or the whole state_dict."""

    def __init__(self, model: nn.Module, consolidate: bool):
        self.model, self.consolidate = model, consolidate

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, state)

    def full_state_dict(self) -> dict[str, Any] | None:
        """Every rank sends its shards; the main rank gets the plain state_dict on the CPU, one
        parameter at a time (`fsdp.consolidate=false`: None, nothing is gathered)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if not self.consolidate:
            return None
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=True))


class ShardedOptimizer:
    """The optimizer over the shards, as a checkpoint part keyed by parameter names (so that
    another number of ranks can load it)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state)
