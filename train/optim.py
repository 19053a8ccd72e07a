"""The optimizer side of a step: optimizer, learning-rate schedule, AMP autocast and scaler,
gradient clipping."""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from common.errors import UserError
from common.schema import OptimConfig
from train.lr import LrPlan, peak_lr

log = logging.getLogger(__name__)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = ("sgd", "adamw")


def check_optimizer_name(name: str) -> None:
    if name not in OPTIMIZERS:
        close = difflib.get_close_matches(name.lower(), OPTIMIZERS, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UserError(f"optim.name={name!r} is not an optimizer: sgd or adamw{hint}")


def param_groups(cfg: OptimConfig, model: nn.Module) -> list[dict[str, Any]]:
    """Weight decay on weight matrices and kernels only unless `decay_norm_and_bias` (timm's
    rule: every parameter of one dimension, biases and norm layers' scales, goes undecayed)."""
    decay_all = cfg.decay_norm_and_bias
    if decay_all is None:
        decay_all = cfg.name == "sgd"
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_all or not cfg.weight_decay:
        return [{"params": params, "weight_decay": cfg.weight_decay}]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


# DTensor (FSDP2's shards) has a sharding rule for torch's fused Adam/AdamW kernels but none for
# its fused SGD (aten._fused_sgd_, torch 2.11 to 2.14): it fails at the first step, and at
# DCP's optimizer-state initialization, which runs a step. Its foreach kernels all shard.
UNSHARDED_FUSED = frozenset({"sgd"})
KNOBS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False},
         "default": {}}


def check_implementation(cfg: OptimConfig, mode: str) -> None:
    """Refuse an `optim.implementation` that cannot step this mode's parameters."""
    if cfg.implementation == "fused" and mode == "fsdp" and cfg.name in UNSHARDED_FUSED:
        raise UserError(f"optim.implementation=fused does not work with mode fsdp and "
                        f"optim.name={cfg.name}: torch has no sharded form of its fused "
                        f"{cfg.name.upper()} (aten._fused_sgd_ on DTensor); set "
                        f"optim.implementation=foreach or auto")


def choose_implementation(cfg: OptimConfig, mode: str, device_type: str) -> str:
    """fused, foreach, loop or default (torch's own choice). auto: torch's fused kernels on
    GPUs (one launch for every parameter) where they take this mode's parameters, else its
    foreach kernels; torch's default on the CPU (a loop: foreach gains nothing there)."""
    check_implementation(cfg, mode)
    if cfg.implementation != "auto":
        return cfg.implementation
    if device_type != "cuda":
        return "default"
    return "foreach" if mode == "fsdp" and cfg.name in UNSHARDED_FUSED else "fused"


def make_optimizer(cfg: OptimConfig, model: nn.Module, lr: float, device_type: str,
                   hooks: OptimizerHooks | None = None) -> torch.optim.Optimizer:
    check_optimizer_name(cfg.name)
    hooks = hooks or PlainHooks()
    impl = KNOBS[choose_implementation(cfg, hooks.name, device_type)]
    groups, build = param_groups(cfg, model), hooks.build_optimizer
    if cfg.name == "adamw":
        return build(groups, torch.optim.AdamW, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps,
                     **impl)
    return build(groups, torch.optim.SGD, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                 **impl)


class LRSchedule:
    """The learning-rate schedule; a checkpointed part, saved as LambdaLR's own state.

    A resume takes the position (the steps done) from the checkpoint and the schedule from this
    config. For the same config that is the very LR the run would have used; a run continued
    with checkpoint.allow_changes=true (more epochs, another optim.lr) follows the schedule
    recomputed over its new length from the current step, as timm and Lightning do: a cosine
    that had reached its end rises to where the longer cosine is at this step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, factor: Callable[[int], float]):
        """`factor`: the multiplier of the peak LR after a number of updates (train/lr.py)."""
        self.optimizer = optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def step(self) -> None:
        self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """After the optimizer's (whose param_groups carry the old run's LR)."""
        base_lrs = list(self.scheduler.base_lrs)  # this config's peak LR
        self.scheduler.load_state_dict(state)
        self.scheduler.base_lrs = base_lrs
        step = self.scheduler.last_epoch
        saved = [group["lr"] for group in self.optimizer.param_groups]
        lrs = [base * fn(step) for fn, base in zip(self.scheduler.lr_lambdas, base_lrs,
                                                   strict=True)]
        for group, base, lr in zip(self.optimizer.param_groups, base_lrs, lrs, strict=True):
            group["initial_lr"], group["lr"] = base, lr
        self.scheduler._last_lr = lrs  # what get_last_lr() reports
        if saved != lrs:
            log.info("learning rate recomputed for this config from step %d: %.4g (the "
                     "checkpoint's schedule: %.4g)", step, lrs[0], saved[0])


@dataclass
class Optimization:
    """What turns gradients into an update; `parts()` are checkpointed."""

    optimizer: torch.optim.Optimizer
    scheduler: LRSchedule
    scaler: torch.amp.GradScaler
    device_type: str
    autocast_dtype: torch.dtype | None
    clip_norm: float | None = None  # optim.clip_grad_norm

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.autocast_dtype,
                              enabled=self.autocast_dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> torch.Tensor | None:
        """The update from the synchronized gradients; with clipping, returns their global
        norm before clipping (a device tensor: no sync here)."""
        norm = None
        if self.clip_norm is not None:
            # The gradients are already summed over micro-batches and averaged over ranks
            # (every rank holds the same): their norm is the global one. Unscaled first under
            # fp16, so the threshold is in true gradient units.
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return norm

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def parts(self) -> dict[str, Any]:
        """The checkpointed parts besides the optimizer, which the strategy hands the
        checkpointer (FSDP's is in pieces across the ranks)."""
        parts: dict[str, Any] = {"scheduler": self.scheduler}
        if self.scaler.is_enabled():  # fp16: its scale and growth tracker
            parts["scaler"] = self.scaler
        return parts


class OptimizerHooks(Protocol):
    """How a strategy builds the optimizer and the loss scaler (train/strategies/base.py)."""

    name: str  # the mode ("fsdp": parameters are DTensor shards)

    def build_optimizer(self, params: Iterable[nn.Parameter], optimizer_class: type,
                        **defaults: Any) -> torch.optim.Optimizer: ...

    def grad_scaler(self, device_type: str, enabled: bool) -> torch.amp.GradScaler: ...


class PlainHooks:
    """A lone optimizer and scaler, as the strategies without their own build them."""

    name = "single"

    def build_optimizer(self, params: Iterable[Any], optimizer_class: type,
                        **defaults: Any) -> torch.optim.Optimizer:
        return optimizer_class(params, **defaults)

    def grad_scaler(self, device_type: str, enabled: bool) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(device_type, enabled=enabled)


def build_optimization(cfg: OptimConfig, precision: str, model: nn.Module, global_batch: int,
                       total_steps: int, steps_per_epoch: int, device_type: str,
                       hooks: OptimizerHooks | None = None) -> Optimization:
    """The optimizer over `model`'s parameters (after the strategy wrapped it: FSDP's are
    shards), built through the strategy's `hooks` (ZeRO wraps it), its schedule and, for
    fp16, a loss scaler."""
    hooks = hooks or PlainHooks()
    peak = peak_lr(cfg, global_batch)
    optimizer = make_optimizer(cfg, model, peak, device_type, hooks)
    # A partial, not the plan itself: LambdaLR saves a callable object's fields and would put
    # an old plan back on resume (with train.epochs changed, under checkpoint.allow_changes).
    plan = LrPlan.of(cfg, peak, total_steps, steps_per_epoch)
    scheduler = LRSchedule(optimizer, functools.partial(LrPlan.__call__, plan))
    scaler = hooks.grad_scaler(device_type, enabled=precision == "fp16")
    return Optimization(optimizer, scheduler, scaler, device_type,
                        AUTOCAST_DTYPES.get(precision), cfg.clip_grad_norm)
