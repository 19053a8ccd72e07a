"""Is this job valid? The checks that the launcher (before starting workers), the doctor (as
rows of its table) and every worker (in case torchrun started it directly) all call.

Each raises `UserError` with one line, or returns warnings.
"""

from __future__ import annotations

from pathlib import Path

from common.errors import UserError
from common.schema import Config, PerfConfig, parse_step_range


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
