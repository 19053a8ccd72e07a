"""Is this config valid? Every check of a config that needs only the config and the world it
would run in (world size, nodes, device kind), in one place: `validate(cfg, world)`.

The launcher calls it before starting workers (a section per row of its checks:
launch/checks.py), `make doctor` shows each section as a row, and every worker calls it once
the process group exists (train/worker.py), in case torchrun started it directly. Only the
checks that need the data or the run's step count wait for the data (`validate_with_data`,
called where the worker builds it). Each check raises `UserError` with one line, or returns
warnings. Values of one key alone are checked by the schema, beside the key.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from common.choices import check_chosen_keys
from common.errors import UserError
from common.records import BEST_METRICS
from common.run_length import (
    check_profile_steps,
    check_run_length,
    known_steps_per_epoch,
    known_total_steps,
)
from common.schema import Config, OptimConfig
from models import check_name
from train.data import DATASETS
from train.optim import check_implementation, check_optimizer_name
from train.refusals import check_refusals


@dataclass(frozen=True, kw_only=True, slots=True)
class World:
    """Where a config would run: what the launcher plans, or what a worker joined."""

    size: int  # workers in all (an elastic job: with every node of its range there)
    device: str  # "cuda" or "cpu": the workers' device kind
    nodes: int = 1  # nodes in all (an elastic job: its MAX)
    min_nodes: int | None = None  # an elastic job's MIN; None for a fixed number of nodes

    @property
    def sizes(self) -> list[int]:
        """Every world size the job may run at (one, unless elastic)."""
        if self.min_nodes is None or self.min_nodes == self.nodes:
            return [self.size]
        per_node = self.size // self.nodes
        return [per_node * n for n in range(self.min_nodes, self.nodes + 1)]


def validate(cfg: Config, world: World, only: Iterable[str] | None = None) -> list[str]:
    """Run every section of checks (`only`: those named), in order; the first problem is a
    UserError, the warnings are returned."""
    names = SECTIONS if only is None else tuple(only)
    warnings: list[str] = []
    for name in names:
        warnings += SECTIONS[name](cfg, world)
    return warnings


def validate_with_data(cfg: Config, num_classes: int, total_steps: int,
                       steps_per_epoch: int | None = None) -> list[str]:
    """The checks that wait for the data: its classes, and the run's steps counted from it
    (the schedule's warmup and milestones against it when `steps_per_epoch` is given)."""
    if (cfg.train.mixup_alpha or cfg.train.cutmix_alpha) and num_classes < 2:
        raise UserError(f"train.mixup_alpha/cutmix_alpha mix the labels of classes; the data "
                        f"has {num_classes} class")
    check_profile_steps(cfg.perf, total_steps)
    return check_run_length(cfg, steps_per_epoch) if steps_per_epoch else []


# --- the sections ------------------------------------------------------------------------------


def check_recipe(cfg: Config, world: World | None = None) -> list[str]:
    """Names that must exist, and options that contradict each other."""
    check_names(cfg)
    check_implementation(cfg.optim, cfg.mode)
    check_lr_options(cfg.optim)
    check_chosen_keys(cfg)
    check_cosine_floor(cfg, world.size if world else 1)
    if cfg.model.init_from and cfg.model.pretrained:
        raise UserError("model.init_from and model.pretrained=true both set the initial "
                        "weights; set one")
    check_run_options(cfg)
    return []


def check_run_options(cfg: Config) -> None:
    """data.val_fraction splits image folders only; checkpoint.best_metric names an epoch
    figure that the run records; log.tensorboard needs its package."""
    if cfg.log.tensorboard and not tensorboard_installed():
        raise UserError("log.tensorboard=true but the tensorboard package is not installed: "
                        "pip install tensorboard (requirements.txt pins it), or set "
                        "log.tensorboard=false")
    if cfg.data.val_fraction and cfg.data.name != "imagefolder":
        raise UserError(f"data.val_fraction={cfg.data.val_fraction:g} splits an image folder's "
                        f"train/; data.name={cfg.data.name} has its own test set: set "
                        f"data.val_fraction=0")
    metric = cfg.checkpoint.best_metric
    if cfg.checkpoint.keep_best and metric not in BEST_METRICS:
        raise UserError(f"checkpoint.best_metric={metric!r} is not an epoch figure; choose one "
                        f"of {', '.join(BEST_METRICS)}")
    if cfg.checkpoint.keep_best and metric.endswith("_ema") and cfg.train.ema_decay is None:
        raise UserError(f"checkpoint.best_metric={metric} needs train.ema_decay (the moving "
                        f"average is evaluated only with it)")


def tensorboard_installed() -> bool:
    try:
        import tensorboard  # noqa: F401 - only whether it imports (torch's writer needs it)
    except ImportError:
        return False
    return True


def check_names(cfg: Config) -> None:
    """The model, the optimizer and the dataset must exist (close matches named)."""
    check_name(cfg.model.name)
    check_optimizer_name(cfg.optim.name)
    if cfg.data.name not in DATASETS:
        raise UserError(f"config: data.name {cfg.data.name!r} is unknown; "
                        f"choose one of {', '.join(sorted(DATASETS))}")


def check_lr_options(cfg: OptimConfig) -> None:
    """Learning-rate options that contradict each other, in one line."""
    if cfg.warmup_steps and cfg.warmup_epochs:
        raise UserError(f"optim.warmup_steps={cfg.warmup_steps} and optim.warmup_epochs="
                        f"{cfg.warmup_epochs:g} both set the warmup; set one")


def check_cosine_floor(cfg: Config, world_size: int) -> None:
    """The cosine ends at optim.min_lr: at or above the peak it would rise, or stay flat."""
    optim = cfg.optim
    if optim.schedule != "cosine" or not optim.min_lr:
        return
    if optim.lr_base_batch is not None:  # the peak as train/lr.py: peak_lr computes it
        peak = optim.lr * cfg.train.batch_size / optim.lr_base_batch
    else:
        peak = optim.lr * {"none": 1.0, "linear": world_size,
                           "sqrt": math.sqrt(world_size)}[optim.scale_lr]
    if optim.min_lr >= peak:
        raise UserError(f"optim.min_lr={optim.min_lr:g} is not below the peak learning rate "
                        f"{peak:g} (optim.lr={optim.lr:g}, scaled): the cosine would rise "
                        f"instead of decay; lower optim.min_lr")


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
        raise UserError("data.decoder=nvjpeg decodes on the GPU; on the CPU use data.decoder=auto")
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


def _device_section(cfg: Config, world: World) -> list[str]:
    if cfg.mode == "dp" and world.nodes > 1:
        raise UserError("mode dp runs one process on one node; several nodes need mode ddp or "
                        "scratch")
    return check_device_options(cfg, world.device)


def check_mode_keys(cfg: Config) -> None:
    """Keys of one mode's section set under another mode would silently do nothing."""
    if cfg.mode != "fsdp" and (changed := _changed(cfg, "fsdp")):
        raise UserError(f"{changed[0]} applies to mode fsdp only (mode is {cfg.mode})")
    for section in ("ddp", "scratch"):  # dp reads neither; ddp and scratch not each other's
        if cfg.mode in ("ddp", "dp", "scratch") and cfg.mode != section and \
                (changed := _changed(cfg, section)):
            raise UserError(f"{changed[0]} applies to mode {section} only (mode is {cfg.mode})")
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


def _batch_section(cfg: Config, world: World) -> list[str]:
    """The global batch splits evenly at every world size the job may run at (elastic: each
    number of nodes in its range), and so do mixup's pairs."""
    sizes = world.sizes
    for size in sizes:
        try:
            check_world_size(cfg, size)
            check_mixing(cfg, size)
        except UserError as exc:
            if len(sizes) == 1:
                raise
            raise UserError(f"{exc} (--nnodes {world.min_nodes}:{world.nodes} runs {sizes[0]} "
                            f"to {sizes[-1]} workers; the batch must divide each of "
                            f"{sizes})") from None
    return []


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


def check_mixing(cfg: Config, world_size: int) -> None:
    """Mixup and CutMix pair each sample with the one half a batch away (train/loop/regularize.py):
    the pairs stay inside each worker's share only when that share is even."""
    if not (cfg.train.mixup_alpha or cfg.train.cutmix_alpha):
        return
    local = cfg.train.batch_size // world_size
    if local % 2:
        raise UserError(f"train.mixup_alpha/cutmix_alpha need an even batch per worker "
                        f"(mixing pairs samples half a batch apart); {cfg.train.batch_size} over "
                        f"{world_size} worker(s) gives {local}")


def _schedule_section(cfg: Config, world: World) -> list[str]:
    """The lr schedule's warmup and milestones inside the run, as far as its steps can be
    counted without the data (the worker checks again with the data: `validate_with_data`,
    which also logs the warnings of a run that train.max_steps cuts short, once)."""
    check_run_length(cfg, known_steps_per_epoch(cfg))
    return []


def _profile_section(cfg: Config, world: World) -> list[str]:
    """perf.profile_steps inside the run, as far as its steps can be counted without the data
    (the worker checks again with the data's count: `validate_with_data`)."""
    check_profile_steps(cfg.perf, known_total_steps(cfg))
    return []


# The sections in the order they run; the launcher and the doctor show one row each.
SECTIONS: dict[str, Callable[[Config, World], list[str]]] = {
    "recipe": check_recipe,
    "device options": _device_section,
    "batch": _batch_section,
    "schedule": _schedule_section,
    "profile": _profile_section,
}
