"""The one training loop, shared by every path: a strategy object does the gradient sync.

The trainer receives its parts built (train/worker.py builds them): model, data, optimization,
guards, checkpointer, run folder and monitor. It runs epochs of steps, evaluates, records,
checkpoints, and stops at a step boundary all ranks agree on.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common.errors import CheckFailed, PeerFailed, UserError
from train.data.batches import split_batch
from train.dist import DistContext, is_comm_failure, peer_failure
from train.evaluation import evaluate
from train.metrics import EpochTrain, epoch_record, summarize
from train.observe.timing import CompileClock, StepTimer
from train.parts import TrainerParts
from train.strategies.base import Strategy

log = logging.getLogger(__name__)


PHASE_WHERE = {  # what a failure message says the loop was doing in each phase
    "data": "loading a batch", "compute": "forward/backward (DDP's gradient allreduce runs in "
    "backward)", "sync": "the gradient allreduce", "optim": "the optimizer step"}


class Interrupted(Exception):
    """SIGTERM/SIGINT: the loop stopped at a step boundary after writing a checkpoint."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"signal {signum} at step {step}")
        self.signum, self.step = signum, step


class Trainer:
    """Trains `parts.model` on `parts.train_data`, evaluates on `parts.test_data`."""

    def __init__(self, ctx: DistContext, parts: TrainerParts):
        self.ctx, self.parts = ctx, parts
        self.strategy, self.plain, self.model = parts.strategy, parts.plain, parts.model
        self.train_data, self.test_data = parts.train_data, parts.test_data
        self.optim, self.state, self.totals = parts.optim, parts.state, parts.totals
        self.guards, self.schedule = parts.guards, parts.schedule
        self.run, self.monitor = parts.run, parts.monitor
        self.timer = StepTimer(ctx.device)
        self.compile_clock = CompileClock(parts.compiled)
        self.where = ""  # what the loop is doing now, for error messages
        self.grad_norm: torch.Tensor | None = None  # the last step's, when clipping

    def fit(self) -> dict[str, Any]:
        """Run the remaining epochs; return the summary written to summary.json."""
        try:
            return self._fit()
        except RuntimeError as exc:
            explained = explain_failure(exc, self.strategy, self.state.step + 1, self.where,
                                        self.guards.timeout_s, self.ctx)
            if explained is None:
                raise
            raise explained from None

    def _fit(self) -> dict[str, Any]:
        started, trained = time.perf_counter(), False
        while not self.finished():
            trained = True
            train = self.train_epoch()
            test = self.evaluate()
            record = epoch_record(self.ctx, train, test, run_facts(self),
                                  self.schedule.global_batch,
                                  self.parts.counters.values())
            self.state.epoch += 1
            self.state.batch_in_epoch = 0
            self.totals.reset()
            self.parts.counters.reset()
            self.run.log_epoch(record)
            self.monitor.log_epoch(record)
            self.save_checkpoint()
            # A stop asked for in the epoch's last step or in evaluation takes effect here,
            # after the epoch is recorded and saved whole (every rank checks alike).
            if not self.finished() and self.guards.stop.should_stop(self.state.step, True):
                self.interrupt()
        summary = summarize(self.run.records, run_facts(self), time.perf_counter() - started)
        if trained:  # a complete run started again keeps the summary of the run that trained
            self.run.finish(summary)
        return summary

    def finished(self) -> bool:
        return (self.state.epoch >= self.schedule.epochs
                or self.state.step >= self.schedule.total_steps)

    def train_epoch(self) -> EpochTrain:
        epoch, guards = self.state.epoch, self.guards
        if not guards.faults.skip_set_epoch:
            self.train_data.set_epoch(epoch)  # without it every epoch has the same order
        self.model.train()
        self.timer.reset()
        first = self.state.batch_in_epoch  # > 0 when resuming inside the epoch
        self.monitor.epoch_start(epoch + 1, self.schedule.steps_per_epoch, first)
        batches = self.train_data.iterate(start=first)
        if self.ctx.distributed:
            # Start the clocks together: otherwise a rank that finished its setup early (the
            # main rank also opens wandb) counts its wait in the first allreduce as compute.
            dist.barrier()
        start = time.perf_counter()
        window = (start, self.state.step)  # when and at which step the last step log was
        while self.state.step < self.schedule.total_steps:
            self.timer.start_step(self.state.step)
            with self.phase("data"):
                batch = next(batches, None)
            if batch is None:
                break
            step_started = time.perf_counter()
            loss, correct = self.train_step(*batch)
            self.compile_clock.note_step(time.perf_counter() - step_started, self.timer)
            self.totals.add(loss * batch[1].shape[0], correct, batch[1].shape[0])
            self.after_step()
            if self.state.step % self.schedule.log_every == 0:
                window = self.log_step(loss, window)
            if guards.stop.should_stop(self.state.step) and not self.epoch_done():
                self.save_checkpoint()
                self.interrupt()
        compile_s = self.compile_clock.take()
        seconds = time.perf_counter() - start - compile_s
        done = self.state.batch_in_epoch
        guards.ledger.check_train(epoch + 1, self.train_data.seen(done), done,
                                  self.schedule.global_batch)
        probe_started = time.perf_counter()
        probe_sync_ms = probe_sync(self)
        return EpochTrain(seconds, done - first, self.timer.per_step_ms(),
                          self.totals.values.clone(), probe_sync_ms,
                          time.perf_counter() - probe_started, compile_s)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor):
        """One optimizer step on this rank's share of the global batch, in
        `train.grad_accum_steps` micro-batches; only the last one synchronizes gradients."""
        images, pairs, lam = self.parts.mixing(images, labels, self.state.step)
        parts = split_batch(images, pairs, self.schedule.grad_accum_steps)
        loss_sum = torch.zeros((), device=images.device)
        correct = torch.zeros((), dtype=torch.long, device=images.device)
        criterion = self.parts.criterion
        with self.phase("compute"):
            self.optim.optimizer.zero_grad(set_to_none=True)
            for i, (x, y) in enumerate(parts):
                last = i == len(parts) - 1
                with contextlib.nullcontext() if last else self.strategy.no_sync(self.model):
                    with self.optim.autocast():
                        logits = self.model(x)
                        # Weighted so that the micro-batches add up to the batch's mean loss.
                        loss = criterion.loss(logits, y, lam) * (y.shape[0] / labels.shape[0])
                    if last:
                        self.guards.faults.inside_step(self.state.step + 1)
                    self.optim.backward(loss)
                loss_sum += loss.detach().float()
                correct += criterion.correct(logits, y, lam)
        with self.phase("sync"):
            self.strategy.sync_gradients(self.model)
        with self.phase("optim"):
            self.grad_norm = self.optim.step()
            if self.parts.ema is not None:
                self.parts.ema.update(self.plain)
        return loss_sum, correct

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        """A timed phase of the step, also what error messages say the loop was doing."""
        self.where = PHASE_WHERE[name]
        return self.timer.phase(name)

    def epoch_done(self) -> bool:
        return (self.state.batch_in_epoch == self.schedule.steps_per_epoch
                or self.state.step == self.schedule.total_steps)

    def interrupt(self) -> None:
        """Leave after a stop request, once the checkpoint just saved is on disk everywhere."""
        if self.ctx.distributed:
            # Schedulers end the whole job at the first process that exits (srun
            # --kill-on-bad-exit): the others must not leave while rank 0 is still writing.
            dist.barrier()
        raise Interrupted(self.guards.stop.requested, self.state.step)

    def after_step(self) -> None:
        self.state.step += 1
        self.state.batch_in_epoch += 1
        self.monitor.advance()
        self.guards.faults.after_step(self.plain, self.state.step)
        self.guards.sync_check.after_step(self.plain, self.state.step)
        every = self.schedule.checkpoint_every
        # The epoch's last step is saved at the epoch's end, with its evaluation.
        if every and self.state.step % every == 0 and not self.epoch_done():
            self.save_checkpoint()

    def log_step(self, loss: torch.Tensor, since: tuple[float, int]) -> tuple[float, int]:
        """Per-step figures every `log.every_steps` steps: loss averaged over ranks, lr, speed."""
        value = loss.detach().float().reshape(1)
        if self.ctx.distributed:
            dist.all_reduce(value)
            value /= self.ctx.world_size
        now = time.perf_counter()
        samples = (self.state.step - since[1]) * self.schedule.global_batch
        self.monitor.log_step(self.state.step, {
            "loss": value.item(), "lr": self.optim.lr,
            # the same on every rank: the norm of the synchronized gradients, before clipping
            **({"grad_norm": self.grad_norm.item()} if self.grad_norm is not None else {}),
            "samples_per_s": samples / max(now - since[0], 1e-9), "epoch": self.state.epoch + 1,
            **{f"time_{k}_ms": v for k, v in self.timer.per_step_ms().items()},
        })
        return now, self.state.step

    def evaluate(self) -> dict[str, Any]:
        """Accuracy over the whole test set: each sample counted once, one all_reduce; the
        weights' moving average beside the model, with `train.ema_decay` ("ema")."""
        self.where = "evaluation"
        self.strategy.sync_buffers(self.model)
        model = self.strategy.eval_model(self.model, self.plain)
        result = evaluate(model, self.test_data.iterate(), self.ctx, self.optim.autocast)
        self.guards.ledger.check_eval(self.state.epoch + 1, self.test_data.indices().tolist(),
                                      len(self.test_data.data))
        if self.parts.ema is not None:
            result["ema"] = evaluate(self.parts.ema.take_buffers(self.plain),
                                     self.test_data.iterate(), self.ctx, self.optim.autocast)
        return result

    def save_checkpoint(self) -> None:
        self.where = "saving a checkpoint"
        self.parts.checkpointer.save()


def probe_sync(trainer: Trainer) -> float | None:
    """For strategies whose sync hides inside backward: an estimate, on a training batch."""
    trainer.where = "the DDP sync probe at the epoch's end"
    if not trainer.strategy.probes_sync:
        return None
    images, labels = next(trainer.train_data.iterate())

    def forward_backward() -> None:
        with trainer.optim.autocast():
            loss = F.cross_entropy(trainer.model(images), labels)
        loss.backward()

    return trainer.strategy.probe_sync_ms(trainer.model, forward_backward)


def run_facts(trainer: Trainer) -> dict[str, Any]:
    """What records and the summary copy as they are."""
    state, strategy = trainer.state, trainer.strategy
    return {"epoch": state.epoch + 1, "epochs": state.epoch, "step": state.step,
            "steps": state.step, "lr": trainer.optim.lr, "mode": strategy.name,
            "sync_method": strategy.sync_method, "probes_sync": strategy.probes_sync,
            "compiled": trainer.parts.compiled, "world_size": trainer.ctx.world_size,
            "backend": trainer.ctx.backend, "device": trainer.ctx.device.type}


def explain_failure(exc: RuntimeError, strategy: Strategy, step: int, where: str,
                    timeout_s: float, ctx: DistContext) -> UserError | None:
    """One line for a failure the strategy knows, or for a collective that failed (nothing
    when the worker that failed first has said why)."""
    explained = strategy.explain(exc, step)
    if explained is not None or not is_comm_failure(exc):
        return explained
    peer = peer_failure(ctx)
    if peer is not None:
        rank, code, message = peer
        return PeerFailed(rank, message, code)
    detail = str(exc).splitlines()[0].rsplit("] ", 1)[-1][:160] if str(exc) else ""
    return CheckFailed(
        f"a collective failed at step {step}, in {where or 'setup'}, after waiting up to "
        f"dist.timeout_s={timeout_s:g} s: another worker stalled or died ({detail})")
