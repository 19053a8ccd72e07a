"""The one table of mode x feature combinations that cannot work, and why.

The launcher (before any worker starts), the doctor and every worker check it through
`check_refusals` (train/preflight.py); docs/pending/matrix.md shows it as `render_table()`
writes it, and tests/test_matrix.py checks that each row is refused and that no combination of
its all-pairs matrix outside the table is. A combination that crashes is a bug to fix, not a
row to add: a row says why the combination cannot work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from common.errors import UserError
from common.schema import Config

MODES = ("ddp", "dp", "scratch", "fsdp")


@dataclass(frozen=True)
class Refusal:
    modes: tuple[str, ...]  # the modes under which `feature` is refused
    feature: str  # as a user sets it (the docs' row)
    applies: Callable[[Config], bool]  # the feature is asked for in this config
    line: str  # the one-line error; {mode} is the run's mode
    overrides: tuple[str, ...]  # overrides that ask for the feature (the matrix's check)


REFUSALS: tuple[Refusal, ...] = (
    Refusal(("dp",), "perf.compile=on", lambda c: c.perf.compile == "on",
            "perf.compile=on does not work with mode dp: DataParallel's replicas of a compiled "
            "model write into the original module (checkpoints break); compile with mode ddp, "
            "or set perf.compile=off", ("perf.compile=on",)),
    # Its copy of the weights would be whole on every rank: what fsdp exists to avoid.
    Refusal(("fsdp",), "train.ema_decay (EMA)", lambda c: c.train.ema_decay is not None,
            "train.ema_decay does not work with mode fsdp (the moving average would keep the "
            "whole model on every rank); use mode ddp for EMA", ("train.ema_decay=0.9",)),
    Refusal(("dp", "scratch", "fsdp"), "ddp.comm_hook (bf16, fp16, powersgd)",
            lambda c: c.ddp.comm_hook != "none",
            "ddp.comm_hook applies to mode ddp only (mode is {mode}): it compresses DDP's "
            "bucket allreduce, which the other modes do not run", ("ddp.comm_hook=bf16",)),
    Refusal(("dp", "scratch"), "ddp.zero", lambda c: c.ddp.zero,
            "ddp.zero applies to mode ddp only (mode is {mode})", ("ddp.zero=true",)),
    Refusal(("fsdp",), "ddp.zero", lambda c: c.ddp.zero,
            "ddp.zero applies to mode ddp only (mode is {mode}); mode fsdp shards the optimizer "
            "state itself (with the parameters and gradients)", ("ddp.zero=true",)),
    # torch's SyncBatchNorm needs DDP's process group and CUDA (the CPU refusal is separate).
    Refusal(("dp", "scratch", "fsdp"), "model.sync_bn", lambda c: c.model.sync_bn,
            "model.sync_bn needs mode ddp on GPUs: torch's SyncBatchNorm runs on CUDA only "
            "(mode is {mode})", ("model.sync_bn=true",)),
    Refusal(("ddp",), "ddp.static_graph=true with train.grad_accum_steps>1",
            lambda c: c.ddp.static_graph and c.train.grad_accum_steps > 1,
            "ddp.static_graph=true with train.grad_accum_steps>1 fails inside DDP (an internal "
            "assert in its reducer after no_sync(), pytorch/pytorch#143580); set "
            "ddp.static_graph=false to accumulate",
            ("ddp.static_graph=true", "train.grad_accum_steps=2")),
)


def refusal_for(cfg: Config) -> Refusal | None:
    """The table's first row that refuses this config, if any."""
    return next((r for r in REFUSALS if cfg.mode in r.modes and r.applies(cfg)), None)


def check_refusals(cfg: Config) -> None:
    """UserError (one line) when the config combines its mode with a feature the table
    refuses."""
    found = refusal_for(cfg)
    if found is not None:
        raise UserError(found.line.format(mode=cfg.mode))


def render_table(mark: Callable[[Refusal, str], str] = lambda r, m: "refused") -> str:
    """The table as markdown: a row per feature, a column per mode, then why."""
    rows = ["| feature | " + " | ".join(MODES) + " | why |",
            "|---|" + "---|" * len(MODES) + "---|"]
    for r in REFUSALS:
        cells = [mark(r, m) if m in r.modes else "" for m in MODES]
        why = r.line.format(mode="/".join(r.modes)).replace("|", "\\|")
        rows.append(f"| {r.feature} | " + " | ".join(cells) + f" | {why} |")
    return "\n".join(rows) + "\n"
