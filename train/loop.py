"""The one training loop, shared by every path; a strategy object does the gradient sync."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from train import checkpoint as ckpt
from train.config import Config, OptimConfig, identity, use_channels_last
from train.data import Batches
from train.dist import DistContext
from train.errors import CheckFailed, UserError
from train.guards import Faults, SampleLedger, StopRequest, SyncChecker, is_comm_failure
from train.monitor import Monitor
from train.runlog import RunFolder
from train.strategies import Single
from train.timing import PHASES, StepTimer, peak_memory_mb

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    batch_in_epoch: int = 0  # optimizer steps completed inside the current epoch


def build_optimizer(cfg: OptimConfig, model: nn.Module, world_size: int) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=scaled_lr(cfg, world_size),
                           momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov)


def scaled_lr(cfg: OptimConfig, world_size: int) -> float:
    """`optim.lr` times the world size (linear rule, Goyal et al.) or its square root (sqrt
    rule), for recipes that grow the global batch with the number of workers."""
    factor = {"none": 1.0, "linear": world_size, "sqrt": math.sqrt(world_size)}[cfg.scale_lr]
    return cfg.lr * factor


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


class Interrupted(Exception):
    """SIGTERM/SIGINT: the loop stopped at a step boundary after writing a checkpoint."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"signal {signum} at step {step}")
        self.signum, self.step = signum, step


class Trainer:
    """Trains `model` on `train_data`, evaluates on `test_data`, writes through `run`."""

    def __init__(self, cfg: Config, ctx: DistContext, strategy: Single, model: nn.Module,
                 train_data: Batches, test_data: Batches, run: RunFolder, monitor: Monitor):
        self.cfg, self.ctx, self.strategy, self.run = cfg, ctx, strategy, run
        self.train_data, self.test_data, self.monitor = train_data, test_data, monitor
        self.steps_per_epoch = len(train_data)
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        # `plain` is the model itself (saved, evaluated, checked); `model` is what trains:
        # maybe compiled, wrapped by the strategy.
        self.channels_last = use_channels_last(cfg, ctx.device.type)
        self.plain = prepare_model(model, cfg, ctx, self.channels_last)
        self.compiled = should_compile(cfg, self.total_steps)
        self.model = strategy.wrap(self.plain)
        if self.compiled:
            self.model = strategy.compile(self.model, cfg.perf.compile_mode)
        self.optimizer = build_optimizer(cfg.optim, self.plain, ctx.world_size)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.perf.precision == "fp16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            cfg.perf.precision)
        self.compile_time_s = 0.0
        self._first_steps_s: list[float] = []
        self._first_step_timed = False
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(lr_factor, cfg.optim, total_steps=self.total_steps))
        self.state = TrainState()
        self.totals = self._zeros()  # this epoch so far: [loss sum, correct, samples]
        self.timer = StepTimer(ctx.device)
        # Agreeing on a stop reads a flag back from the device: on GPUs only every 10 steps.
        self.stop = StopRequest(ctx, grace_s=min(cfg.dist.timeout_s, 30.0),
                                every=10 if ctx.device.type == "cuda" else 5)
        self.sync_check = SyncChecker(cfg.check, ctx)
        self.ledger = SampleLedger(cfg.check, ctx, run.folder if ctx.is_main else None)
        self.faults = Faults(cfg.debug, ctx)
        self.checkpoints = ckpt.Checkpoints(run.checkpoint_dir, cfg.checkpoint.keep)
        self.wandb_run_id: str | None = None

    # --- the loop ---------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Run the remaining epochs; return the summary written to summary.json."""
        try:
            return self._fit()
        except RuntimeError as exc:
            if "Expected to have finished reduction" in str(exc):
                raise CheckFailed(
                    f"some parameters got no gradient in step {self.state.step + 1}: the "
                    f"model's forward does not use them, and DDP waits for their gradients "
                    f"forever; set ddp.find_unused_parameters=true (slower), or remove them",
                    agreed=True) from None
            if not is_comm_failure(exc):
                raise
            where = {"compute": "forward/backward (DDP's gradient allreduce runs in backward)",
                     "sync": "the gradient allreduce", "data": "loading a batch",
                     "optim": "the optimizer step"}.get(self.timer.current, self.timer.current)
            detail = str(exc).splitlines()[0].rsplit("] ", 1)[-1][:160]
            raise CheckFailed(
                f"a collective failed at step {self.state.step + 1}, in {where}, after waiting "
                f"up to dist.timeout_s={self.cfg.dist.timeout_s:g} s: another worker stalled or "
                f"died ({detail})") from None

    def _fit(self) -> dict[str, Any]:
        started, trained = time.perf_counter(), False
        while self.state.epoch < self.cfg.train.epochs and self.state.step < self.total_steps:
            trained = True
            train = self.train_epoch()
            test = self.evaluate()
            record = self.epoch_record(train, test)
            self.state.epoch += 1
            self.state.batch_in_epoch = 0
            self.totals = self._zeros()
            self.run.log_epoch(record)
            self.monitor.log_epoch(record)
            self.save_checkpoint()
            # A stop asked for in the epoch's last step or in evaluation takes effect here,
            # after the epoch is recorded and saved whole (every rank checks alike).
            unfinished = self.state.epoch < self.cfg.train.epochs and \
                self.state.step < self.total_steps
            if unfinished and self.stop.should_stop(self.state.step, force_check=True):
                self.interrupt()
        summary = self.summary(time.perf_counter() - started)
        if trained:  # a complete run started again keeps the summary of the run that trained
            self.run.finish(summary)
        return summary

    def train_epoch(self) -> dict[str, Any]:
        epoch = self.state.epoch
        if not self.cfg.debug.skip_set_epoch:
            self.train_data.set_epoch(epoch)  # without it every epoch has the same order
        self.model.train()
        self.timer.reset()
        first = self.state.batch_in_epoch  # > 0 when resuming inside the epoch
        self.monitor.epoch_start(epoch + 1, self.steps_per_epoch, first)
        batches = self.train_data.iterate(start=first)
        if self.ctx.distributed:
            # Start the clocks together: otherwise a rank that finished its setup early (the
            # main rank also opens wandb) counts its wait in the first allreduce as compute.
            dist.barrier()
        start = time.perf_counter()
        window = (start, self.state.step)  # when and at which step the last step log was
        while self.state.step < self.total_steps:
            self.timer.start_step(self.state.step)
            with self.timer.phase("data"):
                batch = next(batches, None)
            if batch is None:
                break
            step_started = time.perf_counter()
            loss, correct = self.train_step(*batch)
            self.note_compile_time(time.perf_counter() - step_started)
            _accumulate(self.totals, loss * batch[1].shape[0], correct, batch[1].shape[0])
            self.after_step(loss)
            if self.state.step % self.cfg.log.every_steps == 0:
                window = self.log_step(loss, window)
            epoch_done = self.state.batch_in_epoch == self.steps_per_epoch or \
                self.state.step == self.total_steps
            if self.stop.should_stop(self.state.step) and not epoch_done:
                self.save_checkpoint()
                self.interrupt()
        seconds = time.perf_counter() - start - self.compile_time_s
        self.compile_time_s, compile_s = 0.0, self.compile_time_s
        done = self.state.batch_in_epoch - first
        self.ledger.check_train(epoch + 1, self.seen_indices(), self.state.batch_in_epoch,
                                self.cfg.train.batch_size)
        probe_started = time.perf_counter()
        probe_sync_ms = self.probe_sync()
        return {"seconds": seconds, "steps": done, "timing": self.timer.per_step_ms(),
                "totals": self.totals.clone(), "probe_sync_ms": probe_sync_ms,
                "probe_s": time.perf_counter() - probe_started, "compile_s": compile_s}

    def train_step(self, images: torch.Tensor, labels: torch.Tensor):
        """One optimizer step on this rank's share of the global batch, in
        `train.grad_accum_steps` micro-batches; only the last one synchronizes gradients."""
        parts = split_batch(images, labels, self.cfg.train.grad_accum_steps)
        loss_sum = torch.zeros((), device=images.device)
        correct = torch.zeros((), dtype=torch.long, device=images.device)
        with self.timer.phase("compute"):
            self.optimizer.zero_grad(set_to_none=True)
            for i, (x, y) in enumerate(parts):
                last = i == len(parts) - 1
                with contextlib.nullcontext() if last else self.strategy.no_sync(self.model):
                    with torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype,
                                        enabled=self.autocast_dtype is not None):
                        logits = self.model(x)
                        # Weighted so that the micro-batches add up to the batch's mean loss.
                        loss = F.cross_entropy(logits, y) * (y.shape[0] / labels.shape[0])
                    if last:
                        self.faults.inside_step(self.state.step + 1)
                    self.scaler.scale(loss).backward()
                loss_sum += loss.detach().float()
                correct += (logits.argmax(1) == y).sum()
        with self.timer.phase("sync"):
            self.strategy.sync_gradients(self.model)
        with self.timer.phase("optim"):
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
        return loss_sum, correct

    def note_compile_time(self, step_s: float) -> None:
        """torch.compile compiles in this process's first step: that time, less a normal
        step's, is reported as compile time instead of step time."""
        if not self.compiled or len(self._first_steps_s) >= 2:
            return
        self._first_steps_s.append(step_s)
        if len(self._first_steps_s) == 1:
            self._first_step_timed = self.timer.active
        if len(self._first_steps_s) == 2:
            self.compile_time_s = max(0.0, self._first_steps_s[0] - step_s)
            if self._first_step_timed:  # ...nor as compute time in the step-time breakdown
                self.timer.seconds["compute"] = max(
                    0.0, self.timer.seconds["compute"] - self.compile_time_s)
            log.info("torch.compile took about %.1f s (the first step minus the second)",
                     self.compile_time_s)

    def interrupt(self) -> None:
        """Leave after a stop request, once the checkpoint just saved is on disk everywhere."""
        if self.ctx.distributed:
            # Schedulers end the whole job at the first process that exits (srun
            # --kill-on-bad-exit): the others must not leave while rank 0 is still writing.
            dist.barrier()
        raise Interrupted(self.stop.requested, self.state.step)

    def after_step(self, loss: torch.Tensor) -> None:
        self.state.step += 1
        self.state.batch_in_epoch += 1
        self.monitor.advance()
        self.faults.after_step(self.plain, self.state.step)
        self.sync_check.after_step(self.plain, self.state.step)
        every = self.cfg.checkpoint.every_steps
        # The epoch's last step is saved at the epoch's end, with its evaluation.
        inside = self.state.batch_in_epoch < self.steps_per_epoch and \
            self.state.step < self.total_steps
        if every and self.state.step % every == 0 and inside:
            self.save_checkpoint()

    def log_step(self, loss: torch.Tensor, since: tuple[float, int]) -> tuple[float, int]:
        """Per-step figures every `log.every_steps` steps: loss averaged over ranks, lr, speed."""
        value = loss.detach().float().reshape(1)
        if self.ctx.distributed:
            dist.all_reduce(value)
            value /= self.ctx.world_size
        now = time.perf_counter()
        samples = (self.state.step - since[1]) * self.cfg.train.batch_size
        self.monitor.log_step(self.state.step, {
            "loss": value.item(), "lr": self.optimizer.param_groups[0]["lr"],
            "samples_per_s": samples / max(now - since[0], 1e-9), "epoch": self.state.epoch + 1,
            **{f"time_{k}_ms": v for k, v in self.timer.per_step_ms().items()},
        })
        return now, self.state.step

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Accuracy over the whole test set: each sample counted once, one all_reduce."""
        self.timer.current = "evaluation"
        self.strategy.sync_buffers(self.model)
        model = self.strategy.eval_model(self.model, self.plain)
        model.eval()
        totals = self._zeros()
        for images, labels in self.test_data.iterate():
            with torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype,
                                enabled=self.autocast_dtype is not None):
                logits = model(images)
            _accumulate(totals, F.cross_entropy(logits, labels, reduction="sum"),
                        (logits.argmax(1) == labels).sum(), labels.shape[0])
        if self.ctx.distributed:
            dist.all_reduce(totals)
        model.train()
        self.ledger.check_eval(self.state.epoch + 1, self.test_data.indices().tolist(),
                               len(self.test_data.data))
        loss_sum, correct, samples = totals.tolist()
        return {"loss": loss_sum / samples, "accuracy": correct / samples,
                "correct": correct, "samples": samples}

    # --- measurements -----------------------------------------------------------------------

    def probe_sync(self) -> float | None:
        """For strategies whose sync hides inside backward: an estimate, on a training batch."""
        self.timer.current = "the DDP sync probe at the epoch's end"
        if not self.strategy.probes_sync:
            return None
        images, labels = next(self.train_data.iterate())

        def forward_backward() -> None:
            with torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype,
                                enabled=self.autocast_dtype is not None):
                loss = F.cross_entropy(self.model(images), labels)
            loss.backward()

        return self.strategy.probe_sync_ms(self.model, forward_backward)

    def epoch_record(self, train: dict[str, Any], test: dict[str, float]) -> dict[str, Any]:
        """The epoch's figures, train metrics and step times reduced over ranks (mean and max)."""
        timing = dict(train["timing"])
        if train["probe_sync_ms"] is not None:  # DDP: sync hides inside compute; split it out
            timing["sync"] = min(train["probe_sync_ms"], timing["compute"])
            timing["compute"] -= timing["sync"]
        step_ms = sum(timing[p] for p in PHASES)
        local = torch.tensor([*train["totals"].tolist(), *(timing[p] for p in PHASES),
                              peak_memory_mb(self.ctx.device), step_ms], dtype=torch.float64,
                             device=self.ctx.device)
        high = local[3:].clone()
        if self.ctx.distributed:
            dist.all_reduce(local)
            dist.all_reduce(high, op=dist.ReduceOp.MAX)
            local[3:] /= self.ctx.world_size
        loss_sum, correct, samples, *means = local.tolist()
        highs = high.tolist()
        steps_run = train["steps"] * self.cfg.train.batch_size
        record = {
            "epoch": self.state.epoch + 1, "step": self.state.step,
            "train_loss": loss_sum / samples, "train_accuracy": correct / samples,
            "test_loss": test["loss"], "test_accuracy": test["accuracy"],
            "test_samples": int(test["samples"]), "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_time_s": train["seconds"],
            "samples_per_s": steps_run / train["seconds"] if train["seconds"] else 0.0,
            "world_size": self.ctx.world_size, "mode": self.strategy.name,
            "sync_method": self.strategy.sync_method,
        }
        if self.compiled:
            record["compile_time_s"] = train["compile_s"]
        if self.strategy.probes_sync:  # spent after the epoch's steps, not in epoch_time_s
            record["probe_time_s"] = train["probe_s"]
        for i, phase in enumerate(PHASES):
            record[f"time_{phase}_ms"] = means[i]
            record[f"time_{phase}_ms_max"] = highs[i]
        record["peak_memory_mb"], record["peak_memory_mb_max"] = means[-2], highs[-2]
        record["time_step_ms_max"] = highs[-1]  # the slowest rank's whole step
        return record

    def seen_indices(self) -> list[int]:
        """The sample indices this rank trained on in the current epoch, in order."""
        local = self.train_data.batch_size * self.state.batch_in_epoch
        return self.train_data.indices()[:local].tolist()

    def summary(self, seconds: float) -> dict[str, Any]:
        records = self.run.records()
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

    # --- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Every rank contributes its RNG state and running totals; the main worker writes."""
        self.timer.current = "saving a checkpoint"
        mine = {"rng": ckpt.rng_state(), "totals": self.totals.cpu()}
        sync_state = self.strategy.state_dict()
        if sync_state is not None:
            mine["sync"] = sync_state
        ranks: list[Any] = [mine]
        if self.ctx.distributed:
            # Only the main worker writes: gather to it alone (error feedback can be as large
            # as the gradients).
            ranks = [None] * self.ctx.world_size if self.ctx.is_main else None
            dist.gather_object(mine, ranks, dst=0)
        if not self.ctx.is_main:
            return
        self.checkpoints.save({
            "model": self.plain.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **({"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}),
            **asdict(self.state),
            "ranks": ranks,
            "world_size": self.ctx.world_size,
            "config": identity(self.cfg),
            "wandb_run_id": self.wandb_run_id,
        })

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint (already checked against this config and world size)."""
        self.plain.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.state = TrainState(state["epoch"], state["step"], state["batch_in_epoch"])
        ranks = state["ranks"]
        if len(ranks) == self.ctx.world_size:
            ckpt.set_rng_state(ranks[self.ctx.rank]["rng"])
            self.totals = ranks[self.ctx.rank]["totals"].to(self.totals)
            self.strategy.load_state_dict(ranks[self.ctx.rank].get("sync"))
        elif self.ctx.is_main:  # another world size: the epoch's totals so far go to rank 0
            self.totals = sum(r["totals"] for r in ranks).to(self.totals)
        self.wandb_run_id = state.get("wandb_run_id")

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(3, dtype=torch.float64, device=self.ctx.device)


def prepare_model(model: nn.Module, cfg: Config, ctx: DistContext,
                  channels_last: bool) -> nn.Module:
    """The model on its device, in the memory format and with the norm layers asked for."""
    if cfg.debug.unused_parameter:
        model.unused = nn.Linear(2, 2)  # planted: forward never calls it
    if cfg.model.sync_bn and ctx.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(ctx.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def should_compile(cfg: Config, total_steps: int) -> bool:
    """torch.compile pays off once its compile time (about 20 s for LeNet on one CPU thread,
    seconds when cached) is won back by faster steps (about 1.5x here)."""
    if cfg.perf.compile == "auto":
        return total_steps >= cfg.perf.compile_min_steps
    return cfg.perf.compile == "on"


def split_batch(images: torch.Tensor, labels: torch.Tensor, parts: int):
    """The book's split_batch, for gradient accumulation (see train/allreduce.py)."""
    if parts == 1:
        return [(images, labels)]
    from train.allreduce import split_batch as split

    return split(images, labels, parts)


def _accumulate(totals: torch.Tensor, loss_sum: torch.Tensor, correct: torch.Tensor,
                samples: int) -> None:
    totals[0] += loss_sum
    totals[1] += correct
    totals[2] += samples


def check_resumable(cfg: Config, world_size: int, state: dict[str, Any], where: str) -> None:
    """Refuse to continue a checkpoint made by another config or world size, unless allowed."""
    from train.config import describe_differences

    if cfg.checkpoint.allow_changes:
        # Inside an epoch the position is a count of steps over one shuffled order: with
        # another batch size, dataset or seed it no longer says which samples were seen.
        old, new = state["config"], identity(cfg)
        moved = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)
                 and (k in ("train.batch_size", "seed") or k.startswith("data."))]
        if state["batch_in_epoch"] and moved:
            raise UserError(f"{where} stopped inside an epoch ({state['batch_in_epoch']} steps "
                            f"into it) and {', '.join(moved)} changed, so the samples it already "
                            f"trained on are unknown; keep those keys, or set "
                            f"checkpoint.resume=false to start over")
        return
    if state["config"] != identity(cfg):
        raise UserError(f"{where} was written with another config "
                        f"({describe_differences(state['config'], identity(cfg))}); set "
                        f"checkpoint.allow_changes=true to continue with this one, or "
                        f"checkpoint.resume=false to start over")
    if state["world_size"] != world_size:
        raise UserError(f"{where} was written by {state['world_size']} workers and this job has "
                        f"{world_size}; set checkpoint.allow_changes=true to continue with "
                        f"{world_size} (the data is re-sharded, the global batch stays "
                        f"{cfg.train.batch_size})")


__all__ = ["CheckFailed", "Interrupted", "Trainer", "TrainState", "check_resumable"]
