"""The one typed configuration schema: YAML (`yaml.safe_load`) first, then `a.b=value` overrides.

Every key is declared once, here, with its type and a comment. Unknown keys, wrong types and
values outside a key's choices are `UserError`s that name the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from train.errors import UserError


@dataclass
class ModelConfig:
    name: str = "lenet"  # a name in models.MODELS: lenet | resnet18
    sync_bn: bool = False  # SyncBatchNorm across GPUs (ResNet; off as in the book: per-device)
    init: Literal["book", "torch"] = "torch"  # book: N(0, 0.01) weights; torch: its defaults


@dataclass
class SyntheticConfig:
    train_samples: int = 24_000  # generated in memory from `seed`
    test_samples: int = 5_000  # the test set, drawn from the same distribution
    channels: int = 1  # 1x28x28 (Fashion-MNIST-shaped) or 3x32x32 (CIFAR-shaped)
    image_size: int = 28  # pixels per side
    num_classes: int = 10  # one smooth random prototype per class


@dataclass
class DataConfig:
    name: str = "synthetic"  # synthetic | fashion_mnist | mnist | cifar10
    root: str = "data"  # torchvision datasets are read from (and downloaded into) this folder
    download: bool = True  # try to download torchvision datasets that are missing
    on_device: bool = True  # hold the whole dataset on the worker's GPU when it fits
    normalize: bool = True  # zero mean, unit variance per channel (training-set statistics)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TrainConfig:
    epochs: int = 6  # passes over the training set
    batch_size: int = 256  # GLOBAL batch per optimizer step, split evenly across workers
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs)
    grad_accum_steps: int = 1  # micro-batches per optimizer step (no gradient sync but the last)
    eval_batch_size: int = 1024  # per worker; evaluation does no gradient sync


@dataclass
class OptimConfig:
    lr: float = 0.1  # peak learning rate (after warmup)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # L2 penalty, applied by SGD
    nesterov: bool = False  # Nesterov momentum
    schedule: Literal["constant", "cosine"] = "cosine"  # after the warmup
    warmup_steps: int = 0  # linear warmup from 0 to `lr` over this many optimizer steps
    min_lr: float = 0.0  # where the cosine schedule ends
    scale_lr: Literal["none", "linear", "sqrt"] = "none"  # lr x workers, or x sqrt(workers)


@dataclass
class PerfConfig:
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast; fp16 adds a GradScaler (GPU)
    # NHWC memory format for model and inputs; null (auto): on for CPU workers, where oneDNN's
    # NHWC convolutions made LeNet's forward+backward 20% faster here, off on GPUs.
    channels_last: bool | None = None
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile; auto: runs >= min_steps
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = "default"  # torch.compile's mode
    compile_min_steps: int = 2000  # auto compiles runs this long (LeNet breaks even at ~1,600)
    cudnn_benchmark: bool = True  # let cuDNN pick the fastest conv algorithms (GPU)


@dataclass
class DDPConfig:
    bucket_cap_mb: float = 25.0  # gradients per allreduce bucket
    gradient_as_bucket_view: bool = True  # gradients live in the buckets: no copy, less memory
    static_graph: bool = False  # the graph never changes: DDP may skip per-step bookkeeping
    find_unused_parameters: bool = False  # for models whose forward leaves parameters unused
    comm_hook: Literal["none", "fp16", "bf16", "powersgd"] = "none"  # compress the gradients
    powersgd_rank: int = 1  # PowerSGD's matrix approximation rank
    powersgd_start_step: int = 10  # plain allreduce before this step (PowerSGD warm start)


@dataclass
class ScratchConfig:
    algorithm: Literal["naive", "ring"] = "ring"  # naive: sum on rank 0 (the book's); ring
    bucket_mb: float = 25.0  # gradients are flattened into buckets of at most this many MiB
    per_parameter: bool = False  # one allreduce per parameter tensor (the book's way)


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # also every this many optimizer steps (0: only at epoch ends)
    keep: int = 2  # how many recent checkpoints stay on disk
    resume: bool = True  # continue from the latest valid checkpoint in run.dir
    allow_changes: bool = False  # resume even when the config or world size differ


@dataclass
class CheckConfig:
    sync_every_steps: int = 0  # compare a parameter checksum across ranks (0: off)
    sample_ledger: bool = False  # record and check which samples each rank saw, per epoch


@dataclass
class LogConfig:
    progress: Literal["auto", "bar", "lines", "off"] = "auto"  # auto: a bar on a terminal
    every_steps: int = 20  # per-step metrics (console lines, wandb) every this many steps


@dataclass
class DebugConfig:
    """Faults planted on purpose, so tests can show they are caught. Never set in real runs."""

    stall_rank: int = -1  # this rank sleeps `stall_seconds` inside step `stall_step` (1-based)
    stall_step: int = 0  # see stall_rank
    stall_seconds: float = 0.0  # see stall_rank
    desync_rank: int = -1  # this rank perturbs its parameters after step `desync_step`
    desync_step: int = 0  # see desync_rank
    unused_parameter: bool = False  # give the model a parameter its forward never uses
    skip_set_epoch: bool = False  # forget sampler.set_epoch: every epoch the same order
    pad_eval: bool = False  # evaluate with DistributedSampler's padding (duplicates)
    sigterm_rank: int = -1  # this rank sends itself SIGTERM after step `sigterm_step`
    sigterm_step: int = 0  # see sigterm_rank (a preemption notice at a known step)


@dataclass
class RunConfig:
    name: str = ""  # default: run.dir's last part, else the config file's stem
    dir: str = ""  # the run's output folder; default: runs/<name>
    overwrite: bool = False  # replace a different run already in `dir`


@dataclass
class DistConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when visible, else cpu
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on cuda, gloo on cpu
    timeout_s: float = 600.0  # a collective waiting longer than this fails the job
    rendezvous_timeout_s: float = 600.0  # how long node 0 waits for the other nodes to join
    cpu_threads: int = 0  # threads per CPU worker; 0: usable cores / workers on this node
    cpu_flush_denormal: bool = True  # flush denormal floats to zero on CPU (up to 3x faster)


@dataclass
class WandbConfig:
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online with
    # credentials (WANDB_API_KEY or `wandb login`), else offline into run.dir/wandb
    project: str = "dptrain"  # the wandb project
    entity: str | None = None  # team or user; default: your wandb default entity
    name: str | None = None  # default: run.name
    group: str | None = None  # runs of one group sit side by side (make compare sets it)
    tags: list[str] = field(default_factory=list)  # free labels


@dataclass
class Config:
    mode: Literal["ddp", "dp", "scratch"] = "ddp"  # how gradients are synchronized (README "Paths")
    seed: int = 0  # model init, synthetic data and shuffling
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    log: LogConfig = field(default_factory=LogConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


# Keys that change how a run is launched or looked at, not what it computes: a run folder
# accepts the same run again with other values of these.
NON_IDENTITY_KEYS = frozenset({
    "run.name", "run.dir", "run.overwrite", "dist.device", "dist.backend", "dist.timeout_s",
    "dist.rendezvous_timeout_s",
    "dist.cpu_threads", "dist.cpu_flush_denormal", "perf.compile", "perf.compile_mode",
    "perf.compile_min_steps", "perf.cudnn_benchmark", "checkpoint.every_steps", "checkpoint.keep",
    "checkpoint.resume", "checkpoint.allow_changes", "check.sync_every_steps",
    "check.sample_ledger", "log.progress", "log.every_steps", "wandb.mode", "wandb.project",
    "wandb.entity", "wandb.name", "wandb.group", "wandb.tags", "debug.stall_rank",
    "debug.stall_step", "debug.stall_seconds", "debug.desync_rank", "debug.desync_step",
    "debug.sigterm_rank", "debug.sigterm_step",
})


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config, apply `a.b=value` overrides, fill derived defaults, validate."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level")
    cfg = _build(Config, raw, prefix="", source=str(path))
    for item in overrides:
        apply_override(cfg, item)
    if not cfg.run.name:
        cfg.run.name = Path(cfg.run.dir).name if cfg.run.dir else path.stem
    if not cfg.run.dir:
        cfg.run.dir = str(Path("runs") / cfg.run.name)
    validate(cfg)
    return cfg


def apply_override(cfg: Config, item: str) -> None:
    """Set one dotted key from `key=value`; the value is read as YAML, then type-checked."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"override {item!r} is not of the form key=value (e.g. train.epochs=3)")
    *parents, leaf = key.split(".")
    node: Any = cfg
    for i, part in enumerate(parents):
        node = _child(node, part, ".".join(parents[: i + 1]))
        if not dataclasses.is_dataclass(node):
            raise UserError(f"config: {'.'.join(parents[: i + 1])} is a value, not a section")
    _check_known(type(node), leaf, key)
    tp = get_type_hints(type(node))[leaf]
    if dataclasses.is_dataclass(tp):
        raise UserError(f"config: {key} is a section; set one of its keys, e.g. {key}.<key>=...")
    setattr(node, leaf, _coerce(_parse_value(text, tp), tp, key))


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    from models import MODELS  # late: models imports torch
    from train.data import DATASETS

    _choice("model.name", cfg.model.name, MODELS)
    _choice("data.name", cfg.data.name, DATASETS)
    _positive("train.epochs", cfg.train.epochs)
    _positive("train.batch_size", cfg.train.batch_size)
    _positive("train.eval_batch_size", cfg.train.eval_batch_size)
    if cfg.train.max_steps is not None:
        _positive("train.max_steps", cfg.train.max_steps)
    _positive("optim.lr", cfg.optim.lr)
    for key in ("optim.momentum", "optim.weight_decay", "optim.warmup_steps", "optim.min_lr",
                "dist.cpu_threads"):
        _non_negative(key, _get(cfg, key))
    _positive("dist.timeout_s", cfg.dist.timeout_s)
    _positive("dist.rendezvous_timeout_s", cfg.dist.rendezvous_timeout_s)
    if cfg.scratch.bucket_mb <= 0:
        raise UserError(f"config: scratch.bucket_mb must be positive (MiB per bucket); "
                        f"got {cfg.scratch.bucket_mb}; for one allreduce per parameter set "
                        f"scratch.per_parameter=true")
    _non_negative("checkpoint.every_steps", cfg.checkpoint.every_steps)
    _positive("checkpoint.keep", cfg.checkpoint.keep)
    _non_negative("check.sync_every_steps", cfg.check.sync_every_steps)
    _positive("log.every_steps", cfg.log.every_steps)
    _positive("train.grad_accum_steps", cfg.train.grad_accum_steps)
    _positive("ddp.bucket_cap_mb", cfg.ddp.bucket_cap_mb)
    _positive("ddp.powersgd_rank", cfg.ddp.powersgd_rank)
    _non_negative("perf.compile_min_steps", cfg.perf.compile_min_steps)
    syn = cfg.data.synthetic
    for key in ("train_samples", "test_samples", "channels", "num_classes"):
        _positive(f"data.synthetic.{key}", getattr(syn, key))
    if syn.num_classes < 2:
        raise UserError("config: data.synthetic.num_classes must be at least 2")
    if syn.image_size < 16:
        raise UserError("config: data.synthetic.image_size must be at least 16 (LeNet needs it)")


def check_world_size(cfg: Config, world_size: int) -> None:
    """The global batch must split evenly, or workers would train on different batch sizes."""
    if cfg.train.batch_size % world_size:
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} (the global batch) is not divisible by "
            f"{world_size} workers; choose a multiple of {world_size}"
        )
    local = cfg.train.batch_size // world_size
    if local < cfg.train.grad_accum_steps:
        raise UserError(f"train.grad_accum_steps={cfg.train.grad_accum_steps} micro-batches do "
                        f"not fit in {local} samples per worker; lower it")


def use_channels_last(cfg: Config, device_kind: str) -> bool:
    """`perf.channels_last`, with auto (null) resolved for this device."""
    auto = device_kind == "cpu"
    return auto if cfg.perf.channels_last is None else cfg.perf.channels_last


def check_device_options(cfg: Config, device_kind: str) -> list[str]:
    """Options that the device cannot run are errors; those it runs slowly are warnings."""
    cpu = device_kind == "cpu"
    if cpu and cfg.perf.precision == "fp16":
        raise UserError("perf.precision=fp16 needs a GPU (fp16 autocast with a GradScaler); on "
                        "the CPU use bf16 or fp32")
    if cfg.model.sync_bn and (cpu or cfg.mode != "ddp"):
        raise UserError("model.sync_bn needs mode ddp on GPUs: torch's SyncBatchNorm runs on "
                        "CUDA only")
    if cfg.ddp.comm_hook != "none" and cfg.mode != "ddp":
        raise UserError(f"ddp.comm_hook applies to mode ddp only (mode is {cfg.mode})")
    warnings = []
    if cpu and cfg.perf.precision == "bf16" and not _cpu_has_bf16():
        warnings.append("perf.precision=bf16 on a CPU without bf16 units (AVX512-BF16/AMX): "
                        "expect it to be slower than fp32")
    return warnings


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(raw: dict[str, Any], source: str) -> Config:
    """Rebuild a config from a resolved dict (e.g. a run folder's config.yaml)."""
    cfg = _build(Config, raw, prefix="", source=source)
    validate(cfg)
    return cfg


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def identity(cfg: Config) -> dict[str, Any]:
    """The flat keys that define what a run computes (what two runs must share to be one run)."""
    return {k: v for k, v in flatten(to_dict(cfg)).items() if k not in NON_IDENTITY_KEYS}


def identity_hash(cfg: Config) -> str:
    blob = json.dumps(identity(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def describe_differences(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> str:
    """'train.epochs: 5 -> 3, optim.lr: 0.1 -> 0.2' for the keys whose values differ."""
    unset = "<unset>"
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, unset) != new.get(k, unset))
    parts = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return ", ".join(parts)


# --- building and type checking -----------------------------------------------------------


def _build(cls: type, raw: dict[str, Any], prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: {prefix.rstrip('.')} must be a section (a mapping)")
    hints = get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        _check_known(cls, str(key), full, source)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            values[key] = _build(tp, value or {}, full + ".", source)
        else:
            values[key] = _coerce(value, tp, full, source)
    return cls(**values)


def _check_known(cls: type, key: str, full: str, source: str = "config") -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    if key in names:
        return
    close = difflib.get_close_matches(key, names, n=1)
    parent = full[: len(full) - len(key)]
    hint = f" (did you mean {parent}{close[0]}?)" if close else ""
    raise UserError(f"{source}: unknown key {full!r}{hint}")


def _child(node: Any, part: str, full: str) -> Any:
    if not dataclasses.is_dataclass(node):
        raise UserError(f"config: {full.rsplit('.', 1)[0]} is a value, not a section")
    _check_known(type(node), part, full)
    return getattr(node, part)


def _parse_value(text: str, tp: Any) -> Any:
    # Strings stay verbatim (run.name=2024 is the string "2024"); everything else is YAML.
    if _is_text(tp) and text.strip().lower() not in ("null", "~", "none"):
        return text
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text


def _is_text(tp: Any) -> bool:
    if tp is str:
        return True
    if get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in get_args(tp))
    if get_origin(tp) in (typing.Union, types.UnionType):
        return any(_is_text(a) for a in get_args(tp) if a is not type(None))
    return False


def _coerce(value: Any, tp: Any, key: str, source: str = "config") -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        raise UserError(f"{source}: {key} must be one of {', '.join(map(str, choices))}; "
                        f"got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(get_args(tp)):
            return None
        return _coerce(value, args[0], key, source)
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"{source}: {key} expects a list, e.g. [a, b]; got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise UserError(f"{source}: {key} expects {_type_name(tp)}; got {value!r}")
    if tp is float and not math.isfinite(value):  # YAML reads .nan and .inf as numbers
        raise UserError(f"{source}: {key} expects a finite number; got {value!r}")
    return float(value) if tp is float else value


def _type_name(tp: Any) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, str(tp))


def _get(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _choice(key: str, value: str, known: Iterable[str]) -> None:
    if value not in known:
        raise UserError(f"config: {key} {value!r} is unknown; "
                        f"choose one of {', '.join(sorted(known))}")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise UserError(f"config: {key} must be positive; got {value}")


def _non_negative(key: str, value: float) -> None:
    if value < 0:
        raise UserError(f"config: {key} must not be negative; got {value}")
