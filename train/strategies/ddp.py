"""DistributedDataParallel: bucketed gradient allreduce overlapped with backward, optionally
compressed by a comm hook (fp16, bf16, PowerSGD), optionally with the optimizer state sharded
across the ranks (ZeRO stage 1, `ddp.zero`)."""

from __future__ import annotations

import contextlib
import copy
import statistics
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from common.collectives import timed
from common.schema import DDPConfig
from train.dist import DistContext
from train.strategies.base import Strategy, broadcast_together
from train.strategies.powersgd import PowerSGD

# DDP's sync probe: each pair is two extra forward+backward passes at an epoch's end. One pair:
# three made a 4-step ResNet-18 run spend more time probing than training.
PROBE_PAIRS = 1


class DDP(Strategy):
    """DistributedDataParallel: bucketed gradient allreduce overlapped with backward."""

    name = "ddp"
    probes_sync = True
    probe_passes = 2 * PROBE_PAIRS
    measures_sync = False  # inside backward: the loop's sync phase holds nothing
    sync_method = ("estimated: a forward+backward with gradient sync minus one under no_sync(), "
                   "on one training batch after the epoch's steps")

    def __init__(self, ctx: DistContext, cfg: DDPConfig):
        super().__init__(ctx)
        self.cfg = cfg
        self.powersgd: PowerSGD | None = None
        if cfg.comm_hook == "powersgd":
            # The hook keeps error feedback and a step count: probing backwards would change
            # what training computes.
            self.probes_sync = False
            self.sync_method = ("included in compute: not estimated with the PowerSGD hook, "
                                "whose state a probe would advance")

    def build_optimizer(self, params: Iterable[nn.Parameter], optimizer_class: type,
                        **defaults: Any) -> torch.optim.Optimizer:
        if not self.cfg.zero:
            return super().build_optimizer(params, optimizer_class, **defaults)
        from train.strategies.zero import ZeroOptimizer, flat_buckets_fit

        # The checkpointer gathers the state onto the main rank (`consolidate_state_dict`) and
        # saves it whole; on loading, each rank keeps its share.
        params = list(params)
        return ZeroOptimizer(params, optimizer_class,
                             flat_buckets_fit(params, self.ctx.device.type), **defaults)

    def wrap(self, model: nn.Module) -> nn.Module:
        knobs = self.cfg
        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        wrapped = DistributedDataParallel(
            model, device_ids=device_ids, bucket_cap_mb=knobs.bucket_cap_mb,
            gradient_as_bucket_view=knobs.gradient_as_bucket_view,
            static_graph=knobs.static_graph, find_unused_parameters=knobs.find_unused_parameters)
        if knobs.comm_hook == "powersgd":
            self.powersgd = PowerSGD(model, knobs.powersgd_rank, knobs.powersgd_start_step)
            wrapped.register_comm_hook(self.powersgd.state, self.powersgd.hook)
        elif knobs.comm_hook != "none":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            hook = {"fp16": default_hooks.fp16_compress_hook,
                    "bf16": default_hooks.bf16_compress_hook}[knobs.comm_hook]
            wrapped.register_comm_hook(None, hook)
        return wrapped

    def state_dict(self) -> dict[str, Any] | None:
        # PowerSGD's step count, error feedback and low-rank factors: without them a resumed
        # run would redo the warm-up of plain allreduces and lose the accumulated error.
        return None if self.powersgd is None else self.powersgd.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.powersgd is not None and state is not None:
            self.powersgd.load_state_dict(state, self.ctx.device)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return model.no_sync()

    def sync_buffers(self, model: nn.Module) -> None:
        # DDP broadcasts buffers at the start of each training forward, and the forward then
        # updates them with the local batch; after the last step ranks differ slightly.
        broadcast_together(list(self.unwrap(model).buffers()))

    def settle_buckets(self, model: nn.Module, forward_backward: Callable[[], None]) -> None:
        # DDP builds its buckets in parameter order and, after its first backward, rebuilds them
        # in the order gradients arrived: the uninterrupted run did so after step 1. A resumed
        # DDP would run its first step on the first layout, and the layout sets the order in
        # which a ring of 3+ ranks sums each element (and PowerSGD's matrices): the step would
        # differ in the last bits. One backward whose gradients are dropped lets DDP rebuild
        # before the step; the RNG, the buffers and the comm hook's state are put back. It
        # costs one forward and backward per resume.
        plain = self.unwrap(model)
        buffers = [b.detach().clone() for b in plain.buffers()]
        hook_state = copy.deepcopy(self.state_dict())
        devices = [self.ctx.device] if self.ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            forward_backward()
        for buffer, value in zip(plain.buffers(), buffers, strict=True):
            buffer.copy_(value)
        self.load_state_dict(hook_state)
        model.zero_grad(set_to_none=True)

    def probe_sync_ms(self, model: nn.Module, forward_backward: Callable[[], None]) -> float:
        # DDP's allreduce runs inside backward, overlapped with it: what shows is the part of
        # backward that waits for it. Every rank runs the probe together (it communicates).
        plain = self.unwrap(model)
        saved = [b.detach().clone() for b in plain.buffers()]
        deltas = []
        for _ in range(PROBE_PAIRS):
            with model.no_sync():
                alone = timed(forward_backward, self.ctx.device)
            deltas.append(timed(forward_backward, self.ctx.device) - alone)
        for buffer, value in zip(plain.buffers(), saved, strict=True):
            buffer.copy_(value)
        model.zero_grad(set_to_none=True)
        return max(0.0, 1000 * statistics.median(deltas))
