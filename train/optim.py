"""The optimizer side of a step: optimizer, learning-rate schedule, AMP autocast and scaler,
gradient clipping."""

from __future__ import annotations

import contextlib
import difflib
import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from common.errors import UserError
from common.schema import OptimConfig
from train.lr import LrPlan, peak_lr

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


def implementation(cfg: OptimConfig, device_type: str) -> dict[str, bool]:
    """torch's fused kernels on GPUs (one launch for every parameter), its default elsewhere."""
    choice = cfg.implementation
    if choice == "auto":
        choice = "fused" if device_type == "cuda" else "default"
    return {"fused": {"fused": True}, "foreach": {"foreach": True},
            "loop": {"foreach": False}}.get(choice, {})


def make_optimizer(cfg: OptimConfig, model: nn.Module, lr: float,
                   device_type: str) -> torch.optim.Optimizer:
    check_optimizer_name(cfg.name)
    groups, impl = param_groups(cfg, model), implementation(cfg, device_type)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, **impl)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **impl)


@dataclass
class Optimization:
    """What turns gradients into an update; `parts()` are checkpointed."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
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
        parts: dict[str, Any] = {"optimizer": self.optimizer, "scheduler": self.scheduler}
        if self.scaler.is_enabled():  # fp16: its scale and growth tracker
            parts["scaler"] = self.scaler
        return parts


def build_optimization(cfg: OptimConfig, precision: str, model: nn.Module, world_size: int,
                       global_batch: int, total_steps: int, steps_per_epoch: int,
                       device_type: str) -> Optimization:
    peak = peak_lr(cfg, world_size, global_batch)
    optimizer = make_optimizer(cfg, model, peak, device_type)
    # A partial, not the plan itself: LambdaLR saves a callable object's fields and would put
    # an old plan back on resume (with train.epochs changed, under checkpoint.allow_changes).
    plan = LrPlan.of(cfg, peak, total_steps, steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(LrPlan.__call__,
                                                                               plan))
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "fp16")
    return Optimization(optimizer, scheduler, scaler, device_type,
                        AUTOCAST_DTYPES.get(precision), cfg.clip_grad_norm)
