"""The one training loop, shared by every path: a strategy object does the gradient sync.

The trainer receives its parts built (train/worker.py builds them): model, data, optimization,
guards, checkpointer, run folder and monitor. It runs epochs of steps, evaluates, records,
checkpoints, and stops at a step boundary all ranks agree on.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Any

import torch
import torch.distributed as dist

from common.errors import CheckFailed, PeerFailed, UserError
from train.data.batches import split_batch
from train.dist import DistContext, agree, is_comm_failure, peer_failure, peer_went_away
from train.loop.evaluation import evaluate
from train.loop.failures import PHASE_WHERE, known_failure
from train.loop.metrics import EpochTrain, epoch_record, summarize
from train.loop.parts import Guards, TrainerParts
from train.loop.probe import SyncProbe
from train.observe.timing import CompileClock, StepTimer
from train.strategies.base import Strategy

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """A stop signal: the loop stopped at a step boundary after writing a checkpoint."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"signal {signum} at step {step}")
        self.signum, self.step = signum, step


class Trainer:
    """Trains `parts.model` on `parts.train_data`, evaluates on `parts.test_data`."""

    def __init__(self, ctx: DistContext, parts: TrainerParts):
        self.ctx, self.parts = ctx, parts  # each part under one name: parts.<name>
        self.timer = StepTimer(ctx.device, devices=parts.strategy.devices())
        self.compile_clock = CompileClock(parts.compiled)
        self.where = ""  # what the loop is doing now, for error messages
        parts.guards.hang.locate = lambda: (parts.state.step + 1, self.where or "setup")
        self.probe = SyncProbe(parts.strategy, parts.schedule, parts.optim.autocast)
        self.grad_norm: torch.Tensor | None = None  # the last step's, when clipping

    def fit(self) -> dict[str, Any]:
        """Run the remaining epochs; return the summary written to summary.json."""
        parts = self.parts
        try:
            return self._fit()
        except RuntimeError as exc:
            if (explained := explain_failure(exc, parts.strategy, parts.state.step + 1,
                                             self.where, parts.guards, self.ctx)) is None:
                raise
            raise explained from None
        finally:
            parts.profiler.close()

    def _fit(self) -> dict[str, Any]:
        parts = self.parts
        started, trained = time.perf_counter(), False
        parts.guards.stop.begin()
        change = parts.state.world_size_change(self.ctx.world_size)
        while not self.finished():
            trained = True
            train = self.train_epoch()
            evaluated = time.perf_counter()
            test = self.evaluate()
            test["seconds"] = time.perf_counter() - evaluated
            record = epoch_record(self.ctx, train, test, loop_facts(self),
                                  parts.schedule.global_batch, parts.counters.values())
            if change:  # the first epoch record after the change says so
                record["world_size_change"], change = change, None
            parts.state.end_epoch()
            parts.totals.reset()
            parts.counters.reset()
            agree(self.ctx, functools.partial(parts.run.log_epoch, record))  # a full disk: all stop
            parts.monitor.log_epoch(record)
            self.save_checkpoint(final=self.finished())
            # A stop asked for in the epoch's last step or in evaluation takes effect here,
            # after the epoch is recorded and saved whole (every rank checks alike).
            if not self.finished() and parts.guards.stop.should_stop(parts.state.step, True):
                self.interrupt()
        parts.guards.hang.withdraw()  # a stop signal at the very end is no hang
        summary = summarize(parts.run.records, loop_facts(self), time.perf_counter() - started)
        if trained:  # a complete run started again keeps the summary of the run that trained
            agree(self.ctx, lambda: parts.run.finish(summary))
        return summary

    def finished(self) -> bool:
        parts = self.parts
        return (parts.state.epoch >= parts.schedule.epochs
                or parts.state.step >= parts.schedule.total_steps)

    def train_epoch(self) -> EpochTrain:
        parts = self.parts
        epoch, guards = parts.state.epoch, parts.guards
        if not guards.faults.skip_set_epoch:
            parts.train_data.set_epoch(epoch)  # without it every epoch has the same order
        parts.model.train()
        self.timer.reset()
        first = parts.state.batch_in_epoch  # > 0 when resuming inside the epoch
        # This epoch's steps, fewer when train.max_steps ends the run inside it.
        steps = min(parts.schedule.steps_per_epoch,
                    first + parts.schedule.total_steps - parts.state.step)
        parts.monitor.epoch_start(epoch + 1, steps, first)
        batches = parts.train_data.iterate(start=first)
        if self.ctx.distributed:
            # Start the clocks together: otherwise a rank that finished its setup early (the
            # main rank also opens wandb) counts its wait in the first allreduce as compute.
            self.where = f"the barrier where every worker starts epoch {epoch + 1}"
            dist.barrier()
        start = self.timer.clock()
        window = (start, parts.state.step)  # when and at which step the last step log was
        while parts.state.step < parts.schedule.total_steps:
            self.timer.start_step(parts.state.step)
            parts.profiler.step_begins(parts.state.step + 1)
            with self.phase("data"):
                batch = next(batches, None)
            if batch is None:
                break
            step_started = time.perf_counter()
            loss, correct = self.train_step(*batch)
            self.compile_clock.note_step(time.perf_counter() - step_started, self.timer)
            parts.totals.add(loss * batch[1].shape[0], correct, batch[1].shape[0])
            self.after_step()
            parts.profiler.step_ends(parts.state.step)
            if parts.state.step % parts.schedule.log_every == 0:
                window = log_step(self, loss, window)
            if guards.stop.should_stop(parts.state.step) and not self.epoch_done():
                self.save_checkpoint()
                self.interrupt()
        compile_s = self.compile_clock.take()
        seconds = self.timer.clock() - start - compile_s
        done = parts.state.batch_in_epoch
        guards.ledger.check_train(epoch + 1, parts.train_data.seen(done), done,
                                  parts.schedule.global_batch)
        probe_started, spe = time.perf_counter(), parts.schedule.steps_per_epoch
        self.where = "the DDP sync probe at the epoch's end"
        probe_sync_ms, skipped = self.probe.at_epoch_end(parts.model, parts.train_data,
                                                         whole=first == 0 and done == spe)
        return EpochTrain(seconds, done - first, self.timer.per_step_ms(),
                          parts.totals.values.clone(), probe_sync_ms,
                          time.perf_counter() - probe_started, compile_s,
                          self.timer.peak_memory_mb(), skipped)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor):
        """One optimizer step on this rank's share of the global batch, in
        `train.grad_accum_steps` micro-batches; only the last one synchronizes gradients."""
        parts = self.parts
        self.probe.settle(parts.model, images, labels, parts.state.step)  # once, if resumed
        images, pairs, lam = parts.mixing(images, labels, parts.state.step)
        micro = split_batch(images, pairs, parts.schedule.grad_accum_steps)
        loss_sum = torch.zeros((), device=images.device)
        correct = torch.zeros((), dtype=torch.long, device=images.device)
        criterion = parts.criterion
        with self.phase("compute"):
            parts.optim.optimizer.zero_grad(set_to_none=True)
            for i, (x, y) in enumerate(micro):
                last = i == len(micro) - 1
                with contextlib.nullcontext() if last else parts.strategy.no_sync(parts.model):
                    with parts.optim.autocast():
                        logits = parts.model(x)
                        # Weighted so that the micro-batches add up to the batch's mean loss.
                        loss = criterion.loss(logits, y, lam) * (y.shape[0] / labels.shape[0])
                    if last:
                        parts.guards.faults.inside_step(parts.state.step + 1)
                    parts.optim.backward(loss)
                loss_sum += loss.detach().float()
                correct += criterion.correct(logits, y, lam)
        with self.phase("sync"):
            parts.strategy.sync_gradients(parts.model)
        with self.phase("optim"):
            self.grad_norm = parts.optim.step()
            if parts.ema is not None:
                parts.ema.update(parts.plain)
        return loss_sum, correct

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        """A timed phase of the step, also what error messages say the loop was doing."""
        self.where = PHASE_WHERE[name]
        return self.timer.phase(name)

    def epoch_done(self) -> bool:
        parts = self.parts
        return (parts.state.batch_in_epoch == parts.schedule.steps_per_epoch
                or parts.state.step == parts.schedule.total_steps)

    def interrupt(self) -> None:
        """Leave after a stop request, once the checkpoint just saved is on disk everywhere."""
        parts = self.parts
        if self.ctx.distributed:
            # Schedulers end the whole job at the first process that exits (srun
            # --kill-on-bad-exit): the others must not leave while rank 0 is still writing.
            dist.barrier()
        parts.guards.hang.withdraw()  # it reached a step boundary: slow, perhaps, but no hang
        raise Interrupted(parts.guards.stop.requested, parts.state.step)

    def after_step(self) -> None:
        parts = self.parts
        parts.state.step += 1
        parts.state.batch_in_epoch += 1
        parts.monitor.advance()
        parts.guards.faults.after_step(parts.plain, parts.state.step)
        parts.guards.sync_check.after_step(parts.plain, parts.state.step)
        every = parts.schedule.checkpoint_every
        # The epoch's last step is saved at the epoch's end, with its evaluation.
        if every and parts.state.step % every == 0 and not self.epoch_done():
            self.save_checkpoint()

    def evaluate(self) -> dict[str, Any]:
        """Accuracy over the whole test set: each sample counted once, one all_reduce; the
        weights' moving average beside the model, with `train.ema_decay` ("ema")."""
        parts = self.parts
        self.where = "evaluation"
        parts.strategy.sync_buffers(parts.model)
        model = parts.strategy.eval_model(parts.model, parts.plain)
        batches = parts.guards.stop.each_alive(parts.strategy.eval_batches(parts.test_data))
        result = evaluate(model, batches, self.ctx, parts.optim.autocast)
        parts.guards.ledger.check_eval(parts.state.epoch + 1, parts.test_data.indices().tolist(),
                                       len(parts.test_data.data))
        if parts.ema is not None:
            result["ema"] = evaluate(parts.ema.take_buffers(parts.plain),
                                     parts.test_data.iterate(), self.ctx, parts.optim.autocast)
        return result

    def save_checkpoint(self, final: bool = False) -> None:
        """`final`: the run's last one (sharded models are then also gathered into last.pt)."""
        parts = self.parts
        self.where = "saving a checkpoint"
        with parts.guards.stop.busy():
            parts.checkpointer.save(final)
        parts.run.checkpoint_written()



def log_step(trainer: Trainer, loss: torch.Tensor, since: tuple[float, int]) -> tuple[float, int]:
    """Per-step figures every `log.every_steps` steps: loss averaged over ranks, lr, speed."""
    value = loss.detach().float().reshape(1)
    if trainer.ctx.distributed:
        dist.all_reduce(value)
        value /= trainer.ctx.world_size
    now = time.perf_counter()
    state = trainer.parts.state
    samples = (state.step - since[1]) * trainer.parts.schedule.global_batch
    trainer.parts.monitor.log_step(state.step, {
        "loss": value.item(), "lr": trainer.parts.optim.lr,
        # the same on every rank: the norm of the synchronized gradients, before clipping
        **({"grad_norm": trainer.grad_norm.item()} if trainer.grad_norm is not None else {}),
        "samples_per_s": samples / max(now - since[0], 1e-9), "epoch": state.epoch + 1,
        **{f"time_{k}_ms": v for k, v in trainer.timer.per_step_ms().items()},
    })
    return now, state.step


def loop_facts(trainer: Trainer) -> dict[str, Any]:
    """What records and the summary copy as they are."""
    parts, ctx = trainer.parts, trainer.ctx
    state, strategy = parts.state, parts.strategy
    return {"epoch": state.epoch + 1, "epochs": state.epoch, "step": state.step,
            "steps": state.step, "lr": parts.optim.lr, "mode": strategy.name,
            "sync_method": strategy.sync_method, "measures_sync": strategy.measures_sync,
            "compiled": parts.compiled, "world_size": ctx.world_size,
            "backend": ctx.backend, "device": ctx.device.type, **parts.labels,
            "final_checkpoint": parts.checkpointer.last_saved,
            "stopped_by_max_steps": parts.schedule.cut_by_max_steps and trainer.finished()}


def explain_failure(exc: RuntimeError, strategy: Strategy, step: int, where: str,
                    guards: Guards, ctx: DistContext) -> UserError | None:
    """One line for a failure the strategy knows, or for a collective that failed (nothing
    when the worker that failed first has said why; else its waiting rank also writes its
    hang record)."""
    explained = known_failure(exc, step)
    if explained is not None or not is_comm_failure(exc):
        return explained
    peer = peer_failure(ctx)
    if peer is not None:
        rank, code, message = peer
        return PeerFailed(rank, message, code)
    guards.hang.collective_failed(exc)
    detail = str(exc).splitlines()[0].rsplit("] ", 1)[-1].split(". ")[0][:160] if str(exc) else ""
    # A peer that exited closes its connections at once: no waiting happened to speak of.
    why = ("another worker exited (its connection closed)" if peer_went_away(exc) else
           f"after waiting up to dist.timeout_s={guards.timeout_s:g} s: another worker "
           f"stalled or died")
    return CheckFailed(f"a collective failed at step {step}, in {where or 'setup'}, {why} "
                       f"({detail})")
