"""The one training loop, shared by every path; a strategy object does the gradient sync."""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from train.config import Config, OptimConfig
from train.data import Batches
from train.dist import DistContext, all_reduce_sum
from train.runlog import RunFolder
from train.strategies import Single

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)


def lr_factor(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Multiplier of `optim.lr` for the update after `step` updates: linear warmup, then
    constant or cosine down to `optim.min_lr` at `total_steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """Trains `model` on `train_data`, evaluates on `test_data`, writes through `run`."""

    def __init__(self, cfg: Config, ctx: DistContext, strategy: Single, model: nn.Module,
                 train_data: Batches, test_data: Batches, run: RunFolder):
        self.cfg, self.ctx, self.strategy, self.run = cfg, ctx, strategy, run
        self.train_data, self.test_data = train_data, test_data
        self.model = strategy.wrap(model.to(ctx.device))
        self.optimizer = build_optimizer(cfg.optim, model)
        per_epoch = len(train_data)
        self.total_steps = per_epoch * cfg.train.epochs
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(lr_factor, cfg.optim, total_steps=self.total_steps))
        self.state = TrainState()

    def fit(self) -> dict[str, Any]:
        """Run the remaining epochs; return the summary written to summary.json."""
        records: list[dict[str, Any]] = []
        started = time.perf_counter()
        while self.state.epoch < self.cfg.train.epochs and self.state.step < self.total_steps:
            train = self.train_epoch(self.state.epoch)
            test = self.evaluate()
            self.state.epoch += 1
            record = self.epoch_record(train, test)
            records.append(record)
            self.run.log_epoch(record)
            self.run.save_checkpoint(self.checkpoint())
            log.info(format_epoch(record, self.cfg.train.epochs))
        summary = self.summary(records, time.perf_counter() - started)
        self.run.finish(summary)
        return summary

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.train_data.set_epoch(epoch)
        self.model.train()
        # [loss sum, correct, samples], accumulated on the device: no host sync per step.
        totals = torch.zeros(3, dtype=torch.float64, device=self.ctx.device)
        start = time.perf_counter()
        for images, labels in self.train_data:
            loss, correct = self.train_step(images, labels)
            _accumulate(totals, loss * labels.shape[0], correct, labels.shape[0])
            self.state.step += 1
            if self.state.step >= self.total_steps:
                break
        all_reduce_sum(self.ctx, totals)  # also a sync point: the epoch's work is done
        seconds = time.perf_counter() - start
        loss_sum, correct, samples = totals.tolist()
        return {"loss": loss_sum / samples, "accuracy": correct / samples,
                "seconds": seconds, "samples": samples}

    def train_step(self, images: torch.Tensor, labels: torch.Tensor):
        """One optimizer step on this rank's share of the global batch."""
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.strategy.sync_gradients(self.model)
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach(), (logits.argmax(1) == labels).sum()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Accuracy over the whole test set: each sample counted once, one all_reduce."""
        self.strategy.sync_buffers(self.model)
        model = self.strategy.unwrap(self.model)
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.ctx.device)
        for images, labels in self.test_data:
            logits = model(images)
            _accumulate(totals, F.cross_entropy(logits, labels, reduction="sum"),
                        (logits.argmax(1) == labels).sum(), labels.shape[0])
        all_reduce_sum(self.ctx, totals)
        model.train()
        loss_sum, correct, samples = totals.tolist()
        return {"loss": loss_sum / samples, "accuracy": correct / samples,
                "correct": correct, "samples": samples}

    def epoch_record(self, train: dict[str, float], test: dict[str, float]) -> dict[str, Any]:
        return {
            "epoch": self.state.epoch,
            "step": self.state.step,
            "train_loss": train["loss"],
            "train_accuracy": train["accuracy"],
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "test_samples": int(test["samples"]),
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_time_s": train["seconds"],
            "samples_per_s": train["samples"] / train["seconds"],
            "world_size": self.ctx.world_size,
            "mode": self.strategy.name,
        }

    def checkpoint(self) -> dict[str, Any]:
        return {
            "model": self.strategy.unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.state.epoch,
            "step": self.state.step,
            "world_size": self.ctx.world_size,
        }

    def summary(self, records: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
        last = records[-1] if records else {}
        train_time = sum(r["epoch_time_s"] for r in records)
        samples = sum(r["samples_per_s"] * r["epoch_time_s"] for r in records)
        return {
            "epochs": self.state.epoch,
            "steps": self.state.step,
            "final_test_accuracy": last.get("test_accuracy"),
            "best_test_accuracy": max((r["test_accuracy"] for r in records), default=None),
            "final_train_loss": last.get("train_loss"),
            "train_time_s": train_time,
            "wall_time_s": seconds,
            "samples_per_s": samples / train_time if train_time else None,
            "world_size": self.ctx.world_size,
            "mode": self.strategy.name,
            "backend": self.ctx.backend,
            "device": self.ctx.device.type,
            "torch": torch.__version__,
        }


def _accumulate(totals: torch.Tensor, loss_sum: torch.Tensor, correct: torch.Tensor,
                samples: int) -> None:
    totals[0] += loss_sum
    totals[1] += correct
    totals[2] += samples


def format_epoch(record: dict[str, Any], epochs: int) -> str:
    return (f"epoch {record['epoch']}/{epochs}  loss {record['train_loss']:.4f}  "
            f"train acc {record['train_accuracy']:.2%}  test acc {record['test_accuracy']:.2%}  "
            f"{record['epoch_time_s']:.1f} s  {record['samples_per_s']:,.0f} samples/s")
