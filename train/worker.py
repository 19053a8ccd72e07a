"""One worker, from joined process group to trained run: the composition root.

checks -> strategy -> run folder -> data -> model -> optimization, guards, monitor ->
checkpointer -> resume -> fit. Everything is built here and handed to the Trainer.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from common import status
from common.records import VAL_SPLIT_FILE
from common.schema import Config
from common.validate import World, validate, validate_with_data
from train.after.inference import InputSpec
from train.data.build import DataParts, build_data
from train.dist import DistContext, agree
from train.loop.faults import Faults
from train.loop.guards import SampleLedger, StopRequest, SyncChecker
from train.loop.metrics import EpochTotals
from train.loop.parts import Guards, Schedule, TrainerParts, TrainState
from train.loop.regularize import Criterion, Mixing, ModelEma
from train.loop.rng import ProcessRng
from train.loop.trainer import Trainer
from train.model import build_plain_model, set_kernel_choice, should_compile, use_channels_last
from train.observe.console import Console
from train.observe.describe import describe as describe_strategy
from train.observe.monitor import Monitor
from train.observe.profile import make_profiler
from train.observe.tensorboard_sink import TensorBoardSink
from train.observe.wandb_sink import NoWandb, WandbSink, check_usable, resolve_mode
from train.optim import build_optimization
from train.run.best import BestKeeper
from train.run.checkpoint import Checkpointer, Checkpoints
from train.run.folder import RunFolder, open_run
from train.run.hang import HangRecorder, NoHangRecord, enable_fatal_dump
from train.run.identity import identity
from train.run.location import LATEST, settle_run_dir
from train.run.resume import elastic_nodes, resume
from train.strategies import Strategy, make_strategy

log = logging.getLogger("train")


def train(cfg: Config, ctx: DistContext) -> None:
    """Everything between joining and leaving the process group."""
    settle_folder(cfg, ctx)
    # The launcher's checks (common/validate.py) again, on every rank: agreed, so that one
    # process reports them. All of them pass before anything in the run folder changes.
    for warning in agree(ctx, lambda: validate(cfg, world_of(ctx))):
        if ctx.is_main:
            log.warning("%s", warning)
    agree(ctx, lambda: check_usable(cfg.wandb) if ctx.is_main else None)
    set_kernel_choice(cfg.perf, ctx.device.type)
    if ctx.distributed:
        enable_fatal_dump()  # NCCL's watchdog aborts a timed-out rank: its stacks, then
    strategy = make_strategy(cfg, ctx)
    with contextlib.ExitStack() as held:  # the run folder's lock, until the job ends
        run = open_run(cfg, ctx, held)
        log.info("run folder: %s", cfg.run.dir)
        trainer = build_trainer(cfg, ctx, strategy, run)
        for batches in (trainer.parts.train_data, trainer.parts.test_data):
            held.callback(batches.close)  # the stream path's loader processes
        resumed = agree(ctx, lambda: resume(cfg, ctx, trainer.parts.checkpointer, run))
        agree(ctx, lambda: run.start(cfg, resumed_epochs=trainer.parts.state.epoch if resumed
                                     else None))
        agree(ctx, lambda: run.save_classes(trainer.parts.data.classes))
        log.info(describe(cfg, trainer))
        if not say_resumed(cfg, ctx, trainer, resumed):
            return  # complete: nothing is opened (no wandb segment, no sync command)
        agree(ctx, trainer.parts.monitor.start)  # wandb's init, on the main worker
        status.report(trained_from=trainer.parts.state.step)
        try:
            trainer.fit()
        finally:
            trainer.parts.monitor.close()
    log.info("run folder: %s", cfg.run.dir)


def world_of(ctx: DistContext) -> World:
    """The world this worker joined (torchrun starts as many workers on every node)."""
    return World(size=ctx.world_size, device=ctx.device.type,
                 nodes=max(1, ctx.world_size // ctx.local_world_size))


def say_resumed(cfg: Config, ctx: DistContext, trainer: Trainer, resumed: Path | None) -> bool:
    """Where a resumed run continues (and a world size that changed since its checkpoint);
    False when it is complete."""
    if resumed is None:
        return True
    state = trainer.parts.state
    change = state.world_size_change(ctx.world_size)
    if change:
        how = (f"an elastic job, --nnodes {elastic_nodes()}" if elastic_nodes()
               else "checkpoint.allow_changes=true" if cfg.checkpoint.allow_changes
               else "resubmitted on another worker count")
        log.info("world size %d -> %d workers (%s): %s continues at step %d, the data "
                 "re-sharded over %d workers, the global batch still %d", change["from"],
                 change["to"], how, resumed.name, change["step"], change["to"],
                 cfg.train.batch_size)
    if trainer.finished():
        log.info("%s is complete (step %d of %d, from %s): nothing left to train; "
                 "checkpoint.resume=false trains it again", cfg.run.dir, state.step,
                 trainer.parts.schedule.total_steps, resumed.name)
        return False
    log.info("resumed from %s: epoch %d, step %d", resumed, state.epoch + 1, state.step)
    return True


def settle_folder(cfg: Config, ctx: DistContext) -> None:
    """run.dir and run.name, decided as the launcher does (train/run/location.py)."""
    moving = not cfg.run.dir or Path(cfg.run.dir).name == LATEST  # runs/latest may be
    agree(ctx, lambda: settle_run_dir(cfg))
    if not ctx.distributed:
        return
    # runs/latest may change between two ranks' reads: rank 0's holds. A folder named
    # explicitly stays each rank's own: nodes that see different ones (no shared file system)
    # are stopped before training (train/run/resume.py). Every rank takes the same branch.
    asked: list[bool | None] = [None] * ctx.world_size
    torch.distributed.all_gather_object(asked, moving)
    if any(asked):
        chosen = [cfg.run.dir, cfg.run.name]
        torch.distributed.broadcast_object_list(chosen, src=0)
        cfg.run.dir, cfg.run.name = chosen


def build_trainer(cfg: Config, ctx: DistContext, strategy: Strategy, run: RunFolder) -> Trainer:
    """Data, model, optimization, guards, monitor and checkpointer of this worker (the same
    on every path), assembled into a Trainer."""
    nhwc = use_channels_last(cfg.perf, ctx.device.type)
    # A run that continues reads its validation split back (data.val_fraction); one that
    # replaces another or starts over splits the folder as it is now.
    recorded = cfg.checkpoint.resume and not run.replace
    data = load_data(cfg, ctx, nhwc, Path(cfg.run.dir) / VAL_SPLIT_FILE if recorded else None)
    run.held_out = data.held_out  # recorded by run.start
    schedule = make_schedule(cfg, len(data.train))
    for warning in agree(ctx, lambda: validate_with_data(
            cfg, data.facts.num_classes, schedule.total_steps, schedule.steps_per_epoch)):
        if ctx.is_main:
            log.warning("%s", warning)
    plain = agree(ctx, lambda: build_plain_model(cfg, ctx, data.facts, nhwc))
    compiled = should_compile(cfg, schedule.total_steps)
    model = strategy.wrap(plain)
    if compiled:
        model = strategy.compile(model, cfg.perf.compile_mode, cfg.perf.compile_backend)
    optim = build_optimization(cfg.optim, cfg.perf.precision, plain, schedule.global_batch,
                               schedule.total_steps, schedule.steps_per_epoch, ctx.device.type,
                               strategy)
    best = BestKeeper(cfg.checkpoint.best_metric, cfg.checkpoint.best_mode,
                      run.checkpoint_dir) if cfg.checkpoint.keep_best else None
    sinks, tracking = make_sinks(cfg, ctx, strategy, run, schedule, best)
    state, totals = TrainState(), EpochTotals(ctx)
    whole, sharded = strategy.checkpoint_parts(plain, optim.optimizer)
    ema = None if cfg.train.ema_decay is None else ModelEma(plain, cfg.train.ema_decay,
                                                             cfg.train.ema_warmup)
    files = Checkpoints(run.checkpoint_dir, cfg.checkpoint.keep, cfg.debug.disk_full_step,
                        (cfg.debug.slow_save_step, cfg.debug.slow_save_seconds))
    files.best = best
    checkpointer = Checkpointer(
        files, ctx,
        # The class names first: a resume with other classes is refused before the model,
        # whose last layer would not fit, is loaded.
        parts={"classes": data.classes, **whole, **optim.parts(), "position": state,
               "tracking": tracking, "inputs": InputSpec.of(data.facts),
               **({"ema": ema} if ema else {}), **({"best": best} if best else {})},
        rank_parts={"rng": ProcessRng(), "totals": totals, "sync": strategy,
                    "data": data.counters},
        identity=identity(cfg), sharded=sharded)
    return Trainer(ctx, TrainerParts(
        strategy=strategy, plain=plain, model=model, compiled=compiled, channels_last=nhwc,
        train_data=data.train, test_data=data.test, optim=optim, state=state, totals=totals,
        guards=make_guards(cfg, ctx, run), schedule=schedule, run=run, monitor=Monitor(sinks),
        checkpointer=checkpointer, counters=data.counters, data=data.facts,
        criterion=Criterion(cfg.train.label_smoothing), mixing=Mixing(cfg.train, cfg.seed),
        ema=ema, profiler=make_profiler(cfg.perf.profile_steps, run.folder, ctx.rank,
                                        ctx.is_main, ctx.device),
        labels={"model": cfg.model.name, "dataset": cfg.data.name}))


def make_sinks(cfg: Config, ctx: DistContext, strategy: Strategy, run: RunFolder,
               schedule: Schedule, best: BestKeeper | None) -> tuple[list, WandbSink | NoWandb]:
    """The main worker's monitor sinks (console, wandb, TensorBoard, the best epoch's keeper:
    it ranks each epoch's record before the epoch's checkpoint is written); none elsewhere.
    The wandb part is checkpointed on every rank (its run id)."""
    tracking: WandbSink | NoWandb = NoWandb()
    if not ctx.is_main:
        return [], tracking
    sinks: list = [Console(cfg.log, schedule.epochs_in_run, schedule.total_steps)]
    if resolve_mode(cfg.wandb)[0] != "disabled":
        tracking = WandbSink(cfg, ctx, strategy.name, run.folder)
        sinks.append(tracking)
    if cfg.log.tensorboard:
        sinks.append(TensorBoardSink(run.folder))
    return sinks + ([best] if best is not None else []), tracking


def make_schedule(cfg: Config, steps_per_epoch: int) -> Schedule:
    total = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    return Schedule(epochs=cfg.train.epochs, steps_per_epoch=steps_per_epoch, total_steps=total,
                    global_batch=cfg.train.batch_size,
                    grad_accum_steps=cfg.train.grad_accum_steps, log_every=cfg.log.every_steps,
                    checkpoint_every=cfg.checkpoint.every_steps, sync_probe=cfg.log.sync_probe)


def make_guards(cfg: Config, ctx: DistContext, run: RunFolder) -> Guards:
    # Agreeing on a stop reads a flag back from the device, which waits for the GPU's queued
    # steps: there only on the steps whose loss is logged (read back anyway).
    stop = StopRequest(ctx, every=cfg.log.every_steps if ctx.device.type == "cuda" else 5)
    hang = HangRecorder(run.folder, ctx.rank, ctx.world_size) if ctx.distributed else \
        NoHangRecord()
    stop.on_overdue = hang.overdue
    return Guards(stop=stop, sync_check=SyncChecker(cfg.check, ctx),
                  ledger=SampleLedger(cfg.check, ctx, run.folder if ctx.is_main else None),
                  faults=Faults(cfg.debug, ctx), timeout_s=cfg.dist.timeout_s, hang=hang)


def load_data(cfg: Config, ctx: DistContext, channels_last: bool,
              recorded_split: Path | None = None) -> DataParts:
    """Both splits' batches on the memory or the stream path (train/data/build.py)."""
    return build_data(cfg.data, cfg.seed, ctx, cfg.train.batch_size, cfg.train.eval_batch_size,
                      channels_last, pad_eval=cfg.debug.pad_eval, recorded_split=recorded_split)


def recipe_knobs(cfg: Config) -> list[str]:
    """The recipe's features, as the console's first line names them."""
    t, o = cfg.train, cfg.optim
    knobs = [o.name] + ([f"clip {o.clip_grad_norm:g}"] if o.clip_grad_norm else [])
    knobs += [f"label smoothing {t.label_smoothing:g}"] if t.label_smoothing else []
    if t.mixup_alpha or t.cutmix_alpha:
        knobs.append(f"mixup {t.mixup_alpha:g} / cutmix {t.cutmix_alpha:g} (train accuracy "
                     f"counts the dominant label)")
    return knobs + ([f"EMA {t.ema_decay:g}"] if t.ema_decay else [])


def describe(cfg: Config, trainer: Trainer) -> str:
    """The three lines the console starts with: where, what, how long."""
    parts = trainer.parts
    facts = parts.data
    params = sum(p.numel() for p in parts.plain.parameters())
    knobs = [cfg.perf.precision] + (["channels_last"] if parts.channels_last else [])
    knobs += ["torch.compile"] if parts.compiled else []
    if cfg.train.grad_accum_steps > 1:
        knobs.append(f"{cfg.train.grad_accum_steps} micro-batches")
    knobs += recipe_knobs(cfg)
    shape = f"{facts.channels}x{facts.image_size}x{facts.image_size}"
    augment = f", augment {cfg.data.augment}" if cfg.data.augment != "none" else ""
    plan, world = parts.schedule, trainer.ctx.world_size
    length = f"{plan.epochs} epoch{'' if plan.epochs == 1 else 's'} ({plan.total_steps} steps)"
    if plan.cut_by_max_steps:
        length = (f"{plan.total_steps} steps: train.max_steps ends the run in epoch "
                  f"{plan.epochs_in_run} of {plan.epochs}")
    return (
        f"{parts.strategy.name}: {describe_strategy(parts.strategy)}; {', '.join(knobs)}\n"
        f"model {cfg.model.name} ({params:,} parameters); data {cfg.data.name} {shape}: "
        f"{facts.train_samples:,} train / {facts.test_samples:,} test, {facts.num_classes} "
        f"classes{augment}; {facts.note}\n"
        f"global batch {plan.global_batch} ({plan.global_batch // world} per worker), "
        f"{plan.steps_per_epoch} steps/epoch, {length}"
    )


__all__ = ["build_trainer", "train"]
