"""Keys that only one choice of another key reads: set under another choice they would do
nothing, silently (`optim.nesterov=true` with `optim.name=adamw`). Refused in one line, as
`common/validate.py: check_mode_keys` refuses another mode's section.

A key counts as set when its value differs from the schema's default, the one test that
works for a YAML file and the command line alike (a key set to its default does nothing
either way).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.errors import UserError
from common.schema import Config
from models import MODELS


@dataclass(frozen=True)
class OnlyFor:
    """`keys` are read only when `reads(cfg)`; `choice` says which setting that is."""

    keys: tuple[str, ...]  # dotted keys
    reads: Callable[[Config], bool]
    choice: str  # "optim.name=sgd": what reads them
    current: Callable[[Config], str]  # what the config chose instead, as a user sets it


def _is(key: str, value: Any) -> Callable[[Config], bool]:
    return lambda cfg: _get(cfg, key) == value


def _now(*keys: str) -> Callable[[Config], str]:
    return lambda cfg: ", ".join(f"{k}={_shown(_get(cfg, k))}" for k in keys)


# Every key whose meaning depends on another key's choice (the modes' sections: validate.py).
ONLY_FOR: tuple[OnlyFor, ...] = (
    OnlyFor(("optim.momentum", "optim.nesterov"), _is("optim.name", "sgd"),
            "optim.name=sgd", _now("optim.name")),
    # torch's SGD raises "Nesterov momentum requires a momentum" (a traceback per rank)
    OnlyFor(("optim.nesterov",), lambda c: c.optim.momentum > 0, "optim.momentum > 0",
            _now("optim.momentum")),
    OnlyFor(("optim.betas", "optim.eps"), _is("optim.name", "adamw"),
            "optim.name=adamw", _now("optim.name")),
    OnlyFor(("optim.min_lr",), _is("optim.schedule", "cosine"),
            "optim.schedule=cosine", _now("optim.schedule")),
    OnlyFor(("optim.milestones", "optim.gamma"), _is("optim.schedule", "step"),
            "optim.schedule=step", _now("optim.schedule")),
    OnlyFor(("optim.decay_norm_and_bias",), lambda c: c.optim.weight_decay > 0,
            "optim.weight_decay > 0", _now("optim.weight_decay")),
    OnlyFor(("train.ema_warmup",), lambda c: c.train.ema_decay is not None,
            "train.ema_decay", _now("train.ema_decay")),
    OnlyFor(("train.cutmix_prob",), lambda c: bool(c.train.mixup_alpha and c.train.cutmix_alpha),
            "both train.mixup_alpha and train.cutmix_alpha", _now("train.mixup_alpha",
                                                                  "train.cutmix_alpha")),
    OnlyFor(("model.init",), lambda c: c.model.name in MODELS,
            "the book's models (model.name=lenet or resnet18; others keep their builder's "
            "initialization)", _now("model.name")),
    OnlyFor(("data.imagenet.scale", "data.imagenet.ratio", "data.imagenet.flip",
             "data.imagenet.eval_crop"), _is("data.augment", "imagenet"),
            "data.augment=imagenet", _now("data.augment")),
    OnlyFor(("data.cifar.padding", "data.cifar.flip"), _is("data.augment", "cifar"),
            "data.augment=cifar", _now("data.augment")),
    OnlyFor(("data.imagefolder.train", "data.imagefolder.val"), _is("data.name", "imagefolder"),
            "data.name=imagefolder", _now("data.name")),
    OnlyFor(("data.factory",), _is("data.name", "python"), "data.name=python",
            _now("data.name")),
    OnlyFor(("data.memory_gb",), _is("data.loader", "auto"), "data.loader=auto",
            _now("data.loader")),
    OnlyFor(("data.stats_samples",), lambda c: c.data.normalize and c.data.loader != "memory",
            "the stream loader with data.normalize=true (the memory loader uses every image)",
            _now("data.loader", "data.normalize")),
    OnlyFor(("data.cache",), lambda c: c.data.loader != "memory",
            "the stream loader (the memory loader holds the decoded images already)",
            _now("data.loader")),
    OnlyFor(("ddp.powersgd_rank", "ddp.powersgd_start_step"), _is("ddp.comm_hook", "powersgd"),
            "ddp.comm_hook=powersgd", _now("ddp.comm_hook")),
    OnlyFor(("scratch.bucket_mb",), lambda c: not c.scratch.per_parameter,
            "scratch.per_parameter=false", _now("scratch.per_parameter")),
    OnlyFor(("perf.compile_mode", "perf.compile_backend"), lambda c: c.perf.compile != "off",
            "perf.compile=on or auto", _now("perf.compile")),
    OnlyFor(("perf.compile_min_steps",), _is("perf.compile", "auto"), "perf.compile=auto",
            _now("perf.compile")),
)


def check_chosen_keys(cfg: Config) -> None:
    """UserError naming the first key set for a choice the config did not make."""
    for rule in ONLY_FOR:
        if rule.reads(cfg):
            continue
        for key in rule.keys:
            value = _get(cfg, key)
            default = _get(_defaults(), key)
            if value != default:
                raise UserError(f"{key}={_shown(value)} applies only to {rule.choice}; this "
                                f"config has {rule.current(cfg)}, which does not read it: "
                                f"remove it (default {_shown(default)}) or change that choice")


@functools.cache
def _defaults() -> Config:
    return Config()


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _shown(value: Any) -> str:
    """The value as a user writes it on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(_shown(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)
