"""Figures of an epoch and of a run: running totals per rank, reduced over ranks in one
collective each (pytorch/examples' `AverageMeter.all_reduce`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from common.records import PHASES
from train.dist import DistContext
from train.observe.timing import peak_memory_mb


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
    probe_sync_ms: float | None  # DDP's sync estimate, when the strategy probes
    probe_s: float  # what the probe cost
    compile_s: float  # torch.compile's compile time in this epoch


def epoch_record(ctx: DistContext, train: EpochTrain, test: dict[str, float],
                 facts: dict[str, Any], global_batch: int,
                 counts: dict[str, float] | None = None) -> dict[str, Any]:
    """The epoch's figures, train metrics and step times reduced over ranks (mean and max).

    `facts`: epoch, step, lr, mode, sync_method and the like, copied as they are; `counts`:
    this rank's counts (skipped files), summed over ranks."""
    timing = dict(train.timing)
    if train.probe_sync_ms is not None:  # DDP: sync hides inside compute; split it out
        timing["sync"] = min(train.probe_sync_ms, timing["compute"])
        timing["compute"] -= timing["sync"]
    step_ms = sum(timing[p] for p in PHASES)
    local = torch.tensor([*train.totals.tolist(), *(timing[p] for p in PHASES),
                          peak_memory_mb(ctx.device), step_ms], dtype=torch.float64,
                         device=ctx.device)
    high = local[3:].clone()
    if ctx.distributed:
        dist.all_reduce(local)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        local[3:] /= ctx.world_size
    loss_sum, correct, samples, *means = local.tolist()
    highs = high.tolist()
    record = {
        "epoch": facts["epoch"], "step": facts["step"],
        "train_loss": loss_sum / samples, "train_accuracy": correct / samples,
        "test_loss": test["loss"], "test_accuracy": test["accuracy"],
        "test_samples": int(test["samples"]), "lr": facts["lr"],
        "epoch_time_s": train.seconds,
        "samples_per_s": train.steps * global_batch / train.seconds if train.seconds else 0.0,
        "world_size": ctx.world_size, "mode": facts["mode"], "sync_method": facts["sync_method"],
    }
    if "ema" in test:  # train.ema_decay: the moving average, evaluated beside the weights
        record["test_loss_ema"] = test["ema"]["loss"]
        record["test_accuracy_ema"] = test["ema"]["accuracy"]
    if facts.get("compiled"):
        record["compile_time_s"] = train.compile_s
    if facts.get("probes_sync"):
        record["probe_time_s"] = train.probe_s  # spent after the epoch's steps
    for i, phase in enumerate(PHASES):
        record[f"time_{phase}_ms"] = means[i]
        record[f"time_{phase}_ms_max"] = highs[i]
    record["peak_memory_mb"], record["peak_memory_mb_max"] = means[-2], highs[-2]
    record["time_step_ms_max"] = highs[-1]  # the slowest rank's whole step
    if counts:
        summed = torch.tensor(list(counts.values()), dtype=torch.float64, device=ctx.device)
        if ctx.distributed:
            dist.all_reduce(summed)
        record.update(zip(counts, (int(v) for v in summed.tolist()), strict=True))
    return record


def summarize(records: list[dict[str, Any]], facts: dict[str, Any],
              wall_s: float) -> dict[str, Any]:
    """summary.json: the run's final and best figures over every epoch it recorded (those of
    earlier segments of a resumed run too)."""
    last = records[-1] if records else {}
    train_time = sum(r["epoch_time_s"] for r in records)
    samples = sum(r["samples_per_s"] * r["epoch_time_s"] for r in records)
    return {
        "epochs": facts["epochs"],
        "steps": facts["steps"],
        "final_test_accuracy": last.get("test_accuracy"),
        "best_test_accuracy": max((r["test_accuracy"] for r in records), default=None),
        "final_train_loss": last.get("train_loss"),
        **({"final_test_accuracy_ema": last["test_accuracy_ema"],
            "best_test_accuracy_ema": max(r.get("test_accuracy_ema", 0.0) for r in records)}
           if "test_accuracy_ema" in last else {}),
        "train_time_s": train_time,
        "wall_time_s": wall_s,
        "samples_per_s": samples / train_time if train_time else None,
        "world_size": facts["world_size"],
        "mode": facts["mode"],
        "backend": facts["backend"],
        "device": facts["device"],
        "torch": torch.__version__,
    }
