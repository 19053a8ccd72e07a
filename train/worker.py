"""One worker, from joined process group to trained run: the composition root.

checks -> strategy -> run folder -> data -> model -> optimization, guards, monitor ->
checkpointer -> resume -> fit. Everything is built here and handed to the Trainer.
"""

from __future__ import annotations

import logging

import torch

from common.schema import Config
from train.checkpoint import Checkpointer, Checkpoints
from train.data.build import DataParts, build_data
from train.dist import DistContext, agree
from train.faults import Faults
from train.guards import SampleLedger, StopRequest, SyncChecker
from train.identity import identity
from train.metrics import EpochTotals
from train.model import build_plain_model, should_compile, use_channels_last
from train.observe.console import Console
from train.observe.monitor import Monitor
from train.observe.wandb_sink import NoWandb, WandbSink, resolve_mode
from train.optim import build_optimization
from train.parts import Guards, Schedule, TrainerParts, TrainState
from train.preflight import check_device_options, check_mixing, check_recipe, check_world_size
from train.regularize import Criterion, Mixing, ModelEma
from train.resume import check_same_start, resume
from train.rng import ProcessRng
from train.run_folder import RunFolder, open_run
from train.strategies import Strategy, make_strategy
from train.trainer import Trainer

log = logging.getLogger("train")


def train(cfg: Config, ctx: DistContext) -> None:
    """Everything between joining and leaving the process group."""
    # The same checks on every rank: agreed, so that one process reports them.
    agree(ctx, lambda: check_world_size(cfg, ctx.world_size))
    agree(ctx, lambda: check_recipe(cfg))
    for warning in agree(ctx, lambda: check_device_options(cfg, ctx.device.type)):
        if ctx.is_main:
            log.warning("%s", warning)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.perf.cudnn_benchmark
    strategy = make_strategy(cfg, ctx)
    run = agree(ctx, lambda: open_run(cfg, ctx))
    trainer = build_trainer(cfg, ctx, strategy, run)
    resumed = agree(ctx, lambda: resume(cfg, ctx, trainer.parts.checkpointer, run))
    check_same_start(ctx, resumed, cfg.run.dir)
    run.start(cfg, resumed_epochs=trainer.state.epoch if resumed else None)
    run.save_classes(trainer.parts.data.classes)
    log.info(describe(cfg, trainer))
    if resumed and trainer.finished():
        log.info("%s is complete (step %d of %d, from %s): nothing left to train; "
                 "checkpoint.resume=false trains it again", cfg.run.dir, trainer.state.step,
                 trainer.schedule.total_steps, resumed)
    elif resumed:
        log.info("resumed from %s: epoch %d, step %d", resumed, trainer.state.epoch + 1,
                 trainer.state.step)
    trainer.monitor.start()
    try:
        trainer.fit()
    finally:
        trainer.monitor.close()
    log.info("run folder: %s", cfg.run.dir)


def build_trainer(cfg: Config, ctx: DistContext, strategy: Strategy, run: RunFolder) -> Trainer:
    """Data, model, optimization, guards, monitor and checkpointer of this worker (the same
    on every path), assembled into a Trainer."""
    nhwc = use_channels_last(cfg.perf, ctx.device.type)
    data = load_data(cfg, ctx, nhwc)
    agree(ctx, lambda: check_mixing(cfg, ctx.world_size, data.facts.num_classes))
    schedule = make_schedule(cfg, len(data.train))
    plain = agree(ctx, lambda: build_plain_model(cfg, ctx, data.facts, nhwc))
    compiled = should_compile(cfg, schedule.total_steps)
    model = strategy.wrap(plain)
    if compiled:
        model = strategy.compile(model, cfg.perf.compile_mode)
    optim = build_optimization(cfg.optim, cfg.perf.precision, plain, ctx.world_size,
                               schedule.global_batch, schedule.total_steps,
                               schedule.steps_per_epoch, ctx.device.type)
    sinks: list = [Console(cfg.log, cfg.train.epochs)] if ctx.is_main else []
    tracking: WandbSink | NoWandb = NoWandb()
    if ctx.is_main and resolve_mode(cfg.wandb)[0] != "disabled":
        tracking = WandbSink(cfg, ctx, strategy.name, run.folder)
        sinks.append(tracking)
    state, totals = TrainState(), EpochTotals(ctx)
    ema = None if cfg.train.ema_decay is None else ModelEma(plain, cfg.train.ema_decay,
                                                             cfg.train.ema_warmup)
    checkpointer = Checkpointer(
        Checkpoints(run.checkpoint_dir, cfg.checkpoint.keep), ctx,
        # The class names first: a resume with other classes is refused before the model,
        # whose last layer would not fit, is loaded.
        parts={"classes": data.classes, "model": plain, **optim.parts(), "position": state,
               "tracking": tracking, **({"ema": ema} if ema else {})},
        rank_parts={"rng": ProcessRng(), "totals": totals, "sync": strategy,
                    "data": data.counters},
        identity=identity(cfg))
    return Trainer(ctx, TrainerParts(
        strategy, plain, model, compiled, nhwc, data.train, data.test, optim, state, totals,
        make_guards(cfg, ctx, run), schedule, run, Monitor(sinks), checkpointer, data.counters,
        data.facts, Criterion(cfg.train.label_smoothing), Mixing(cfg.train, cfg.seed), ema))


def make_schedule(cfg: Config, steps_per_epoch: int) -> Schedule:
    total = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    return Schedule(cfg.train.epochs, steps_per_epoch, total, cfg.train.batch_size,
                    cfg.train.grad_accum_steps, cfg.log.every_steps, cfg.checkpoint.every_steps)


def make_guards(cfg: Config, ctx: DistContext, run: RunFolder) -> Guards:
    # Agreeing on a stop reads a flag back from the device: on GPUs only every 10 steps.
    stop = StopRequest(ctx, grace_s=min(cfg.dist.timeout_s, 30.0),
                       every=10 if ctx.device.type == "cuda" else 5)
    return Guards(stop, SyncChecker(cfg.check, ctx),
                  SampleLedger(cfg.check, ctx, run.folder if ctx.is_main else None),
                  Faults(cfg.debug, ctx), cfg.dist.timeout_s)


def load_data(cfg: Config, ctx: DistContext, channels_last: bool) -> DataParts:
    """Both splits' batches on the memory or the stream path (train/data/build.py)."""
    return build_data(cfg.data, cfg.seed, ctx, cfg.train.batch_size, cfg.train.eval_batch_size,
                      channels_last, pad_eval=cfg.debug.pad_eval)


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
    facts = trainer.parts.data
    params = sum(p.numel() for p in trainer.plain.parameters())
    knobs = [cfg.perf.precision] + (["channels_last"] if trainer.parts.channels_last else [])
    knobs += ["torch.compile"] if trainer.parts.compiled else []
    if cfg.train.grad_accum_steps > 1:
        knobs.append(f"{cfg.train.grad_accum_steps} micro-batches")
    knobs += recipe_knobs(cfg)
    shape = f"{facts.channels}x{facts.image_size}x{facts.image_size}"
    schedule, world = trainer.schedule, trainer.ctx.world_size
    augment = f", augment {cfg.data.augment}" if cfg.data.augment != "none" else ""
    return (
        f"{trainer.strategy.name}: {trainer.strategy.describe()}; {', '.join(knobs)}\n"
        f"model {cfg.model.name} ({params:,} parameters); data {cfg.data.name} {shape}: "
        f"{facts.train_samples:,} train / {facts.test_samples:,} test, {facts.num_classes} "
        f"classes{augment}; {facts.note}\n"
        f"global batch {schedule.global_batch} ({schedule.global_batch // world} per worker), "
        f"{schedule.steps_per_epoch} steps/epoch, {schedule.epochs} epochs"
        + (f", at most {cfg.train.max_steps} steps" if cfg.train.max_steps else "")
    )


__all__ = ["build_trainer", "train"]
