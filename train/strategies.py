"""How gradients are synchronized: the only thing that differs between the training paths.

A strategy wraps the model for training, performs the gradient sync after backward (or lets
the wrapper do it inside backward), and unwraps for evaluation and saving. Data, model, loop,
metrics and checkpoints are the same code for every strategy, so comparisons are fair.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from train.config import Config
from train.dist import DistContext, visible_gpus
from train.errors import UserError

PROBE_PAIRS = 3  # DDP's sync probe: each pair is two extra forward+backward passes per epoch


class Single:
    """One process, one device: no synchronization at all (the reference for parity tests)."""

    name = "single"
    sync_method = "none: one process"
    probes_sync = False  # True: the sync hides inside backward and is estimated by a probe

    def __init__(self, ctx: DistContext, cfg: Config):
        self.ctx, self.cfg = ctx, cfg

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def compile(self, model: nn.Module, mode: str) -> nn.Module:
        """torch.compile around the wrapper: for DDP, dynamo then splits the graph at bucket
        boundaries so that the allreduce still overlaps backward; compiled inside, DDP would
        get every gradient at once at the end of one fused backward."""
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


class DDP(Single):
    """DistributedDataParallel: bucketed gradient allreduce overlapped with backward."""

    name = "ddp"
    probes_sync = True
    sync_method = ("estimated: a forward+backward with gradient sync minus one under no_sync(), "
                   f"same batch, median of {PROBE_PAIRS} pairs at each epoch end")

    def __init__(self, ctx: DistContext, cfg: Config):
        super().__init__(ctx, cfg)
        if cfg.ddp.comm_hook == "powersgd":
            # The hook keeps error feedback and a step count: probing backwards would change
            # what training computes.
            self.probes_sync = False
            self.sync_method = ("included in compute: not estimated with the PowerSGD hook, "
                                "whose state a probe would advance")

    def wrap(self, model: nn.Module) -> nn.Module:
        knobs = self.cfg.ddp
        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        wrapped = DistributedDataParallel(
            model, device_ids=device_ids, bucket_cap_mb=knobs.bucket_cap_mb,
            gradient_as_bucket_view=knobs.gradient_as_bucket_view,
            static_graph=knobs.static_graph, find_unused_parameters=knobs.find_unused_parameters)
        self.powersgd = None
        if knobs.comm_hook == "powersgd":
            from train.powersgd import PowerSGD

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
        for buffer in self.unwrap(model).buffers():
            dist.broadcast(buffer, src=0)

    def probe_sync_ms(self, model: nn.Module, forward_backward: Callable[[], None]) -> float:
        # DDP's allreduce runs inside backward, overlapped with it: what shows is the part of
        # backward that waits for it. Every rank runs the probe together (it communicates).
        plain = self.unwrap(model)
        saved = [b.detach().clone() for b in plain.buffers()]
        deltas = []
        for _ in range(PROBE_PAIRS):
            with model.no_sync():
                alone = _timed(forward_backward, self.ctx.device)
            deltas.append(_timed(forward_backward, self.ctx.device) - alone)
        for buffer, value in zip(plain.buffers(), saved, strict=True):
            buffer.copy_(value)
        model.zero_grad(set_to_none=True)
        return max(0.0, 1000 * statistics.median(deltas))


class DataParallel(Single):
    """nn.DataParallel: one process drives every GPU; the batch is scattered from the first one.

    The first GPU also gathers the outputs and computes the loss, so it runs out of memory
    first (PITFALLS 11). On a machine without GPUs DataParallel has nothing to split.
    """

    name = "dp"
    sync_method = ("included in compute: DataParallel replicates the model in forward and "
                   "reduces gradients onto the first GPU in backward")

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.ctx.device.type == "cpu":
            # DataParallel takes every visible GPU by default: with `--cpu` on a GPU machine it
            # would demand the model on cuda:0. On the CPU there is nothing to split.
            return model
        return nn.DataParallel(model)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.DataParallel) else model

    def compile(self, model: nn.Module, mode: str) -> nn.Module:
        # Dynamo does not trace DataParallel's replicate/scatter threads: compile each replica's
        # module instead.
        if isinstance(model, nn.DataParallel):
            model.module = torch.compile(model.module, mode=mode)
            return model
        return super().compile(model, mode)

    def eval_model(self, model: nn.Module, plain: nn.Module) -> nn.Module:
        return model  # scatter evaluation batches over the GPUs too


class Scratch(Single):
    """Our own gradient allreduce on point-to-point messages (train/allreduce.py), no wrapper."""

    name = "scratch"
    sync_method = "measured: wall time around our allreduce of the gradients"

    def wrap(self, model: nn.Module) -> nn.Module:
        from train import allreduce

        # Start every replica from rank 0's weights, as DDP does.
        for tensor in [*model.parameters(), *model.buffers()]:
            allreduce.broadcast(tensor.data, src=0)
        bucket_mb = None if self.cfg.scratch.per_parameter else self.cfg.scratch.bucket_mb
        self.gradients = allreduce.GradientSync(model.parameters(), self.cfg.scratch.algorithm,
                                                bucket_mb)
        return model

    def sync_gradients(self, model: nn.Module) -> None:
        self.gradients.sync()

    def sync_buffers(self, model: nn.Module) -> None:
        from train import allreduce

        for buffer in model.buffers():
            allreduce.broadcast(buffer, src=0)


def make_strategy(cfg: Config, ctx: DistContext) -> Single:
    """The strategy for `cfg.mode` in this process (a lone process needs no sync)."""
    if cfg.mode == "dp":
        if ctx.distributed:
            raise UserError("mode dp runs ONE process that drives every GPU; start it with "
                            "`python -m launch --mode dp` (not torchrun, not several nodes)",
                            agreed=True)
        return DataParallel(ctx, cfg)
    if not ctx.distributed:
        return Single(ctx, cfg)
    return {"ddp": DDP, "scratch": Scratch}[cfg.mode](ctx, cfg)


def dp_note() -> str:
    gpus = visible_gpus()
    if gpus == 0:
        return "DataParallel on the CPU: there are no GPUs to split the batch over"
    return f"DataParallel over {gpus} GPU(s) in one process"


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
