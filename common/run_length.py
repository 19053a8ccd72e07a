"""The learning-rate schedule against the run's length: a warmup that never ends, or a step
milestone that never comes, is a schedule that does not do what the config says.

The run's length is `train.epochs` x steps per epoch. Steps per epoch need the data (the
worker checks once it has built it: `common/validate.py: validate_with_data`); what is in
epochs (`optim.warmup_epochs`, `optim.milestones`) is checked before, against `train.epochs`.
`train.max_steps` cuts a run short on purpose (a smoke run): a warmup or milestone past it is a
warning, not an error.
"""

from __future__ import annotations

from common.errors import UserError
from common.schema import Config, OptimConfig, PerfConfig, parse_step_range


def warmup_in_steps(cfg: OptimConfig, steps_per_epoch: int) -> int:
    """The warmup's optimizer steps: `warmup_steps`, or `warmup_epochs` of the data's steps."""
    return cfg.warmup_steps or round(cfg.warmup_epochs * steps_per_epoch)


def check_run_length(cfg: Config, steps_per_epoch: int | None) -> list[str]:
    """UserError when the warmup or a milestone lies at or beyond the run's end; warnings when
    `train.max_steps` ends the run before them. `steps_per_epoch`: None when not known yet."""
    optim, epochs = cfg.optim, cfg.train.epochs
    _check_milestones(optim, epochs, steps_per_epoch)
    if steps_per_epoch is None:
        if optim.warmup_epochs >= epochs:
            raise UserError(f"optim.warmup_epochs={optim.warmup_epochs:g} does not end before "
                            f"the run does (train.epochs={epochs}): the learning rate would "
                            f"never leave the warmup; choose fewer than {epochs} epochs")
        return []
    total, warmup = epochs * steps_per_epoch, warmup_in_steps(optim, steps_per_epoch)
    length = (f"the run has {total} optimizer steps ({epochs} epoch(s) of {steps_per_epoch} "
              f"steps)")
    if warmup >= total:
        raise UserError(f"{_warmup_key(optim, warmup)} does not end before the run does: "
                        f"{length}; the learning rate would never leave the warmup; choose a "
                        f"warmup shorter than {total} steps")
    if _powersgd_start(cfg) >= total:  # torch compresses from its iteration N: step N + 1
        raise UserError(f"ddp.powersgd_start_step={cfg.ddp.powersgd_start_step} is at or past "
                        f"the run's end: {length}; PowerSGD (from step "
                        f"{cfg.ddp.powersgd_start_step + 1}) would never compress a gradient; "
                        f"choose fewer than {total}")
    return _cut_short(cfg, steps_per_epoch, warmup)


def _powersgd_start(cfg: Config) -> int:
    """ddp.powersgd_start_step when this run uses PowerSGD, else 0."""
    if cfg.mode != "ddp" or cfg.ddp.comm_hook != "powersgd":
        return 0
    return cfg.ddp.powersgd_start_step


def _check_milestones(optim: OptimConfig, epochs: int, steps_per_epoch: int | None) -> None:
    """A milestone m lowers the lr once m epochs are done: it must be below train.epochs."""
    if optim.schedule != "step":
        return
    late = [m for m in optim.milestones if m >= epochs]
    if late:
        steps = f" ({epochs * steps_per_epoch} optimizer steps)" if steps_per_epoch else ""
        raise UserError(f"optim.milestones={_listed(optim.milestones)}: "
                        f"{', '.join(map(str, late))} lie at or beyond the run's end (a "
                        f"milestone m lowers the lr after m epochs; the run has {epochs} "
                        f"epoch(s){steps}); choose milestones below {epochs}")


def _cut_short(cfg: Config, steps_per_epoch: int, warmup: int) -> list[str]:
    """Warnings: train.max_steps ends the run inside the warmup or before a milestone."""
    cut, total = cfg.train.max_steps, cfg.train.epochs * steps_per_epoch
    if cut is not None and cut > total:
        return [f"train.max_steps={cut} is beyond the run's end: it has {total} optimizer steps "
                f"({cfg.train.epochs} epoch(s) of {steps_per_epoch}); train.epochs ends it"]
    if cut is None or cut == total:
        return []
    warnings = []
    if warmup >= cut:
        warnings.append(f"train.max_steps={cut} ends the run inside the warmup ({warmup} "
                        f"steps): the learning rate never reaches optim.lr")
    if _powersgd_start(cfg) >= cut:
        warnings.append(f"train.max_steps={cut} ends the run before PowerSGD starts "
                        f"(ddp.powersgd_start_step={cfg.ddp.powersgd_start_step})")
    if cfg.optim.schedule == "step":
        late = [m for m in cfg.optim.milestones if m * steps_per_epoch >= cut]
        if late:
            warnings.append(f"train.max_steps={cut} ends the run before optim.milestones "
                            f"{', '.join(map(str, late))} (epochs of {steps_per_epoch} steps)")
    return warnings


def _warmup_key(optim: OptimConfig, steps: int) -> str:
    if optim.warmup_steps:
        return f"optim.warmup_steps={optim.warmup_steps}"
    return f"optim.warmup_epochs={optim.warmup_epochs:g} ({steps} steps)"


def _listed(values: list[int]) -> str:
    return "[" + ",".join(map(str, values)) + "]"


def known_steps_per_epoch(cfg: Config) -> int | None:
    """Optimizer steps per epoch when known without the data (synthetic data), else None."""
    if cfg.data.name != "synthetic":
        return None
    return cfg.data.synthetic.train_samples // cfg.train.batch_size or None


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
