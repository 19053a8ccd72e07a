"""The worker's model: built by name from the registry (models/), then placed on the device in
the memory format and with the norm layers asked for. The parallel wrapping is the strategy's."""

from __future__ import annotations

import os

import torch
from torch import nn

from common.schema import Config, PerfConfig
from models import build_model
from train.data.build import DataFacts
from train.dist import DistContext


def use_channels_last(perf: PerfConfig, device_kind: str) -> bool:
    """`perf.channels_last`, with auto (null) resolved for this device: on for CPU workers."""
    return device_kind == "cpu" if perf.channels_last is None else perf.channels_last


def should_compile(cfg: Config, total_steps: int) -> bool:
    """torch.compile pays off once its compile time (about 20 s for LeNet on one CPU thread,
    seconds when cached) is won back by faster steps (about 1.5x here). Never for mode dp:
    DataParallel's replicate writes into a compiled module's original (its children become
    `_orig_mod`), which breaks the model and what checkpoints save (`on` is refused there)."""
    if cfg.mode == "dp":
        return False
    if cfg.perf.compile == "auto":
        return total_steps >= cfg.perf.compile_min_steps
    return cfg.perf.compile == "on"


def set_kernel_choice(perf: PerfConfig, device_kind: str) -> None:
    """How this process picks GPU kernels: cuDNN's benchmark mode (the fastest algorithm per
    shape, timed at the first use), or `perf.deterministic` (the same bits on every run)."""
    if device_kind != "cuda":
        return
    if perf.deterministic:
        # cuBLAS reads it when it creates its handle, at the first matmul: still to come.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = perf.deterministic
    torch.backends.cudnn.benchmark = perf.cudnn_benchmark and not perf.deterministic


def build_plain_model(cfg: Config, ctx: DistContext, data: DataFacts,
                      channels_last: bool) -> nn.Module:
    """The model for `data`'s shape (channels, training resolution, classes) with the same
    initial weights on every rank, on this worker's device."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg.model.name, data.channels, data.num_classes, data.image_size,
                        init=cfg.model.init)
    if cfg.debug.unused_parameter:
        model.unused = nn.Linear(2, 2)  # planted: forward never calls it
    if cfg.model.sync_bn and ctx.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(ctx.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
