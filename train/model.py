"""The worker's model: built by name (models/), started from `model.init_from` when given,
checked against the data's shape, then placed on the device in the memory format and with the
norm layers asked for. The parallel wrapping is the strategy's."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import UserError
from common.schema import Config, ModelConfig, PerfConfig
from models import build_model
from train.data.build import DataFacts
from train.dist import DistContext

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP/DataParallel and torch.compile add these


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
    shape, timed at the first use), or `perf.deterministic` (the same bits on every run); TF32
    for fp32 work as `perf.tf32` says."""
    if device_kind != "cuda":
        return
    if perf.deterministic:
        # cuBLAS reads it when it creates its handle, at the first matmul: still to come.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = perf.deterministic
    torch.backends.cudnn.benchmark = perf.cudnn_benchmark and not perf.deterministic
    if perf.tf32 != "torch":
        # The API torch 2.11 to 2.14 take without warning, and the one users know (Lightning
        # suggests it); mixing it with the newer `fp32_precision` flags makes torch raise.
        on = perf.tf32 == "on"
        torch.set_float32_matmul_precision("high" if on else "highest")
        torch.backends.cudnn.allow_tf32 = on


def build_plain_model(cfg: Config, ctx: DistContext, data: DataFacts,
                      channels_last: bool) -> nn.Module:
    """The model for `data`'s shape (channels, training resolution, classes) with the same
    initial weights on every rank, on this worker's device."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg.model.name, data.channels, data.num_classes, data.image_size,
                        init=cfg.model.init, pretrained=cfg.model.pretrained)
    if cfg.model.init_from:
        model.load_state_dict(read_weights(cfg.model.init_from, model))
    if cfg.debug.unused_parameter:
        model.unused = nn.Linear(2, 2)  # planted: forward never calls it
    if cfg.model.sync_bn and ctx.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(ctx.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    check_shape(cfg.model, model, data, ctx.device, channels_last)
    return model


def check_shape(cfg: ModelConfig, model: nn.Module, data: DataFacts, device: torch.device,
                channels_last: bool) -> None:
    """One forward of two blank images before training: a model that cannot take the data's
    images (a ViT built for 224 pixels on 28x28 ones) fails here in one line, not at step 1."""
    shape = (data.channels, data.image_size, data.image_size)
    images = torch.zeros(2, *shape, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()  # batch norm's statistics stay untouched
    try:
        with torch.no_grad():
            out = model(images)
    except Exception as exc:  # noqa: BLE001 - whatever the model raises, it is the shape
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        expects = _expected_input(model)
        raise UserError(f"model {cfg.name} does not take the data's images of shape "
                        f"{'x'.join(map(str, shape))}{expects}: {first}; set data.image_size "
                        f"or pick another model") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, data.num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"model {cfg.name} gives outputs of shape {got} for 2 images of shape "
                        f"{'x'.join(map(str, shape))}; expected (2, {data.num_classes}): one "
                        f"logit per class")


def _expected_input(model: nn.Module) -> str:
    """What the model says it takes, where it says (torchvision's ViTs and Swins: image_size)."""
    size = getattr(model, "image_size", None)
    return f" (it takes 3x{size}x{size})" if isinstance(size, int) else ""


def read_weights(path: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """`path`'s weights for `model`: a checkpoint of ours (its "model"), or a state_dict file
    (wrapper prefixes removed); loaded with weights_only; keys and shapes must match."""
    state = load_state_dict_file(path)
    problem = misfit(state, model)
    if problem:
        raise UserError(f"model.init_from={path} does not fit the model: keys {problem}",
                        agreed=True)
    return state


def misfit(state: Mapping[str, torch.Tensor], model: nn.Module) -> str | None:
    """How the state_dict `state` does not fit `model` (keys missing, unexpected, of another
    shape), in a few words; None when it fits (`load_state_dict` would take it)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
    if shapes:
        key = shapes[0]
        parts.append(f"{len(shapes)} of another shape ({key}: {tuple(state[key].shape)} in "
                     f"the file, {tuple(own[key].shape)} in the model)")
    return "; ".join(parts) or None


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict from `path` (ours: a checkpoint's "model"); one line when it is not one."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"model.init_from={path}: no such file")
    try:
        loaded: Any = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - not a torch file, or pickled objects
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"model.init_from={path} is not a state dict torch can load with "
                        f"weights_only=True ({first})") from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping):
        loaded = loaded["model"]  # one of our checkpoints
    elif isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]  # Lightning's and others' checkpoints
    if not (isinstance(loaded, Mapping) and loaded
            and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                    for k, v in loaded.items())):
        raise UserError(f"model.init_from={path} is not a state dict (names to tensors); got "
                        f"a {type(loaded).__name__}")
    return {_strip(k): v for k, v in loaded.items()}


def _strip(key: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _few(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")
