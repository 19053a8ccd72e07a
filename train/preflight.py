"""Is this job valid? The checks that the launcher (before starting workers), the doctor (as
rows of its table) and every worker (in case torchrun started it directly) all call.

Each raises `UserError` with one line, or returns warnings.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from common.errors import UserError
from common.schema import Config, PerfConfig, parse_step_range
from train.refusals import check_refusals


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


def profile_range(text: str) -> tuple[int, int]:
    """perf.profile_steps as (first, last) step; the schema already checked its form."""
    found = parse_step_range(text)
    if found is None:
        raise UserError(f"perf.profile_steps must be A-B with 1 <= A <= B; got {text!r}")
    return found


def known_total_steps(cfg: Config) -> int | None:
    """The run's optimizer steps when they can be counted without the data (synthetic data,
    or train.max_steps); None otherwise. Steps per epoch do not depend on the world size."""
    total = cfg.train.max_steps
    if cfg.data.name == "synthetic":
        steps = cfg.data.synthetic.train_samples // cfg.train.batch_size * cfg.train.epochs
        total = min(steps, total) if total else steps
    return total


def check_profile_steps(perf: PerfConfig, total_steps: int | None) -> None:
    """The profiled steps must lie inside the run (`total_steps`: None when unknown yet)."""
    if not perf.profile_steps or total_steps is None:
        return
    first, last = profile_range(perf.profile_steps)
    if last > total_steps:
        raise UserError(f"perf.profile_steps={perf.profile_steps} is outside the run: it has "
                        f"{total_steps} optimizer steps (1-{total_steps}); choose steps in "
                        f"that range")


def check_device_options(cfg: Config, device_kind: str) -> list[str]:
    """Options that the device cannot run are errors; those it runs slowly are warnings."""
    cpu = device_kind == "cpu"
    if cpu and cfg.perf.precision == "fp16":
        raise UserError("perf.precision=fp16 needs a GPU (fp16 autocast with a GradScaler); on "
                        "the CPU use bf16 or fp32")
    check_refusals(cfg)  # mode x feature: the one table (train/refusals.py)
    if cfg.model.sync_bn and cpu:
        raise UserError("model.sync_bn needs mode ddp on GPUs: torch's SyncBatchNorm runs on "
                        "CUDA only")
    if cpu and cfg.data.decoder == "nvjpeg":
        raise UserError("data.decoder=nvjpeg decodes on the GPU; on the CPU use data.decoder=pil")
    if cfg.data.decoder == "nvjpeg" and (cfg.data.name != "imagefolder"
                                         or cfg.data.loader != "stream"
                                         or cfg.data.cache != "none"):
        raise UserError("data.decoder=nvjpeg needs data.name=imagefolder, data.loader=stream "
                        "and data.cache=none (it decodes files on the GPU as they stream)")
    check_mode_keys(cfg)
    warnings = []
    if cpu and cfg.perf.precision == "bf16" and not _cpu_has_bf16():
        warnings.append("perf.precision=bf16 on a CPU without bf16 units (AVX512-BF16/AMX): "
                        "expect it to be slower than fp32")
    return warnings


def check_mode_keys(cfg: Config) -> None:
    """Keys of one mode's section set under another mode would silently do nothing."""
    if cfg.mode != "fsdp" and (changed := _changed(cfg, "fsdp")):
        raise UserError(f"{changed[0]} applies to mode fsdp only (mode is {cfg.mode})")
    if cfg.mode == "fsdp" and (changed := _changed(cfg, "ddp") or _changed(cfg, "scratch")):
        mode = changed[0].split(".")[0]
        raise UserError(f"{changed[0]} is a key of mode {mode}, which mode fsdp does not read "
                        f"(it shards with the fsdp.* keys); remove it")


def _changed(cfg: Config, section: str) -> list[str]:
    """`section.key=value` (the value as YAML writes it) for each key of a config section that
    differs from the schema's default."""
    values = getattr(cfg, section)
    out = []
    for f in dataclasses.fields(values):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        value = getattr(values, f.name)
        if value != default:
            shown = str(value).lower() if isinstance(value, bool) else value
            out.append(f"{section}.{f.name}={shown}")
    return out


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_recipe(cfg: Config) -> None:
    """Model and optimizer names, the lr's options, mixup's batch, `model.init_from`'s file:
    what the launcher can tell before any worker starts (the workers check again)."""
    from models import check_name
    from train.lr import check_lr_options
    from train.model import load_state_dict_file
    from train.optim import check_optimizer_name

    check_name(cfg.model.name)
    check_optimizer_name(cfg.optim.name)
    check_lr_options(cfg.optim)
    if cfg.model.init_from:
        load_state_dict_file(cfg.model.init_from)
    if cfg.model.init_from and cfg.model.pretrained:
        raise UserError("model.init_from and model.pretrained=true both set the initial "
                        "weights; set one")


def check_mixing(cfg: Config, world_size: int, num_classes: int | None = None) -> None:
    """Mixup and CutMix pair each sample with the one half a batch away (train/mixing.py): the
    pairs stay inside each worker's share only when that share is even."""
    if not (cfg.train.mixup_alpha or cfg.train.cutmix_alpha):
        return
    if num_classes is not None and num_classes < 2:
        raise UserError(f"train.mixup_alpha/cutmix_alpha mix the labels of classes; the data "
                        f"has {num_classes} class")
    local = cfg.train.batch_size // world_size
    if local % 2:
        raise UserError(f"train.mixup_alpha/cutmix_alpha need an even batch per worker "
                        f"(mixing pairs samples half a batch apart); {cfg.train.batch_size} over "
                        f"{world_size} worker(s) gives {local}")
