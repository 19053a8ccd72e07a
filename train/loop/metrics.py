"""Figures of an epoch and of a run: running totals per rank, reduced over ranks in one
collective each (pytorch/examples' `AverageMeter.all_reduce`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from common.records import PHASES
from train.dist import DistContext


class EpochTotals:
    """This rank's [loss sum, correct, samples] of the epoch so far; a checkpointed rank part
    (a resume inside an epoch continues its sums)."""

    def __init__(self, ctx: DistContext):
        self.ctx = ctx
        self.values = torch.zeros(3, dtype=torch.float64, device=ctx.device)

    def add(self, loss_sum: torch.Tensor, correct: torch.Tensor, samples: int) -> None:
        self.values[0] += loss_sum
        self.values[1] += correct
        self.values[2] += samples

    def reset(self) -> None:
        self.values.zero_()

    def state_dict(self) -> torch.Tensor:
        return self.values.cpu()

    def load_state_dict(self, state: torch.Tensor) -> None:
        self.values.copy_(state)

    def load_other_world(self, states: list[torch.Tensor]) -> None:
        """Another world size: rank 0 takes every old rank's sums, the others start at zero."""
        self.values.zero_()
        if self.ctx.is_main:
            self.values.copy_(sum(states))


@dataclass
class EpochTrain:
    """What an epoch's training part measured on this rank."""

    seconds: float  # the steps' wall time (compile time taken out)
    steps: int  # optimizer steps taken in this segment of the epoch
    timing: dict[str, float]  # ms per step by phase
    totals: torch.Tensor  # [loss sum, correct, samples]
    probe_sync_ms: float | None  # DDP's sync estimate, when the probe ran
    probe_s: float  # what the probe cost (seconds)
    compile_s: float  # torch.compile's compile time in this epoch
    peak_memory_mb: list[float]  # the epoch's peak of each device this rank drives (dp: all)
    probe_skipped: str | None = None  # why a strategy that probes did not, at this epoch's end


def gather_ranks(ctx: DistContext, local: torch.Tensor) -> torch.Tensor:
    """Every rank's `local` vector, one row per rank, in rank order (one all_gather)."""
    if not ctx.distributed:
        return local.unsqueeze(0)
    gathered = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, local)
    return torch.stack(gathered)


def epoch_record(ctx: DistContext, train: EpochTrain, test: dict[str, float],
                 facts: dict[str, Any], global_batch: int,
                 counts: dict[str, float] | None = None) -> dict[str, Any]:
    """The epoch's figures: train metrics summed over ranks, step times and memory as the mean,
    the max and each rank's value (one all_gather of every rank's vector).

    `test`: evaluate()'s figures and its `seconds`. `facts`: epoch, step, lr, mode, sync_method
    and the like, copied as they are. The sync time is None (n/a) where it hides inside
    compute and no probe estimated it. `counts`: this rank's counts (skipped files), summed
    over ranks."""
    timing = dict(train.timing)
    if train.probe_sync_ms is not None:  # DDP: sync hides inside compute; split it out
        timing["sync"] = min(train.probe_sync_ms, timing["compute"])
        timing["compute"] -= timing["sync"]
    sync_known = train.probe_sync_ms is not None or facts["measures_sync"]
    step_ms = sum(timing[p] for p in PHASES)
    peaks = train.peak_memory_mb
    # Each rank's figures: phases, its mean peak, its step, and (over a dp process's GPUs) its
    # highest and lowest peak.
    local = torch.tensor([*train.totals.tolist(), *(timing[p] for p in PHASES),
                          sum(peaks) / len(peaks), step_ms, max(peaks), min(peaks)],
                         dtype=torch.float64, device=ctx.device)
    ranks = gather_ranks(ctx, local)
    per_rank = ranks[:, 3:].T.tolist()  # one row per figure, one value per rank
    lowest = ranks[:, -1].min().item()
    loss_sum, correct, samples = ranks[:, :3].sum(0).tolist()
    means, highs = ranks[:, 3:].mean(0).tolist(), ranks[:, 3:].max(0).values.tolist()
    record = {
        "epoch": facts["epoch"], "step": facts["step"],
        "train_loss": loss_sum / samples, "train_accuracy": correct / samples,
        "test_loss": test["loss"], "test_accuracy": test["accuracy"],
        "test_samples": int(test["samples"]), "lr": facts["lr"],
        "epoch_time_s": train.seconds,
        "samples_per_s": train.steps * global_batch / train.seconds if train.seconds else 0.0,
        "eval_time_s": test["seconds"],  # after the epoch's steps, not in epoch_time_s
        # the sync probe's seconds (after the steps too); None where it did not run
        "probe_time_s": train.probe_s if train.probe_sync_ms is not None else None,
        "world_size": ctx.world_size, "mode": facts["mode"], "sync_method": facts["sync_method"],
    }
    if train.probe_skipped:
        record["sync_method"] = (f"not estimated in this epoch ({train.probe_skipped}): DDP's "
                                 f"sync runs inside backward, counted in compute")
    if "ema" in test:  # train.ema_decay: the moving average, evaluated beside the weights
        record.update(test_loss_ema=test["ema"]["loss"], test_accuracy_ema=test["ema"]["accuracy"])
    if facts.get("compiled"):
        record["compile_time_s"] = train.compile_s
    record.update(timing_figures(means, highs, per_rank, lowest, peaks, sync_known))
    if counts:
        record.update(sum_counts(ctx, counts))
    return record


def timing_figures(means: list[float], highs: list[float], per_rank: list[list[float]],
                   lowest: float, peaks: list[float], sync_known: bool) -> dict[str, Any]:
    """The step's phases and the memory peaks: mean, max and each rank's (epoch_record)."""
    figures: dict[str, Any] = {}
    for i, phase in enumerate(PHASES):
        known = phase != "sync" or sync_known
        figures[f"time_{phase}_ms"] = means[i] if known else None
        figures[f"time_{phase}_ms_max"] = highs[i] if known else None
        # each rank's value, for stragglers (`make plot`)
        figures[f"time_{phase}_ms_ranks"] = per_rank[i] if known else None
    peak, step = len(PHASES), len(PHASES) + 1  # their columns
    top = highs[-2]
    # The spread shows an imbalance: dp's first GPU holds the outputs and the loss.
    figures.update(peak_memory_mb=means[peak], peak_memory_mb_max=top,
                   peak_memory_mb_spread=top - lowest, peak_memory_mb_ranks=per_rank[peak])
    if len(peaks) > 1:
        figures["peak_memory_mb_gpus"] = peaks
    figures["time_step_ms_max"] = highs[step]  # the slowest rank's whole step
    figures["time_step_ms_ranks"] = per_rank[step]
    return figures


def sum_counts(ctx: DistContext, counts: dict[str, float]) -> dict[str, int]:
    """This rank's counts (skipped files), summed over ranks (one all_reduce)."""
    summed = torch.tensor(list(counts.values()), dtype=torch.float64, device=ctx.device)
    if ctx.distributed:
        dist.all_reduce(summed)
    return dict(zip(counts, (int(v) for v in summed.tolist()), strict=True))


def summarize(records: list[dict[str, Any]], facts: dict[str, Any],
              wall_s: float) -> dict[str, Any]:
    """summary.json: the run's final and best figures over every epoch it recorded (those of
    earlier segments of a resumed run too)."""
    last = records[-1] if records else {}
    best = max(records, key=lambda r: r["test_accuracy"], default={})  # the first of equals
    train_time = sum(r["epoch_time_s"] for r in records)
    samples = sum(r["samples_per_s"] * r["epoch_time_s"] for r in records)
    return {
        "model": facts.get("model"),
        "dataset": facts.get("dataset"),
        "epochs": facts["epochs"],
        "steps": facts["steps"],
        "stopped_by_max_steps": facts.get("stopped_by_max_steps", False),
        "final_test_accuracy": last.get("test_accuracy"),
        "best_test_accuracy": best.get("test_accuracy"),
        "best_epoch": best.get("epoch"),
        "final_train_loss": last.get("train_loss"),
        "final_checkpoint": facts.get("final_checkpoint"),
        **({"final_test_accuracy_ema": last["test_accuracy_ema"],
            "best_test_accuracy_ema": max(r.get("test_accuracy_ema", 0.0) for r in records)}
           if "test_accuracy_ema" in last else {}),
        "train_time_s": train_time,
        "eval_time_s": sum(r.get("eval_time_s") or 0.0 for r in records),
        "wall_time_s": wall_s,
        "samples_per_s": samples / train_time if train_time else None,
        "world_size": facts["world_size"],
        "mode": facts["mode"],
        "backend": facts["backend"],
        "device": facts["device"],
        "torch": torch.__version__,
        # an elastic job's membership changes (or allowed ones): {"step", "from", "to"}
        "world_size_changes": [r["world_size_change"] for r in records
                               if "world_size_change" in r],
    }
