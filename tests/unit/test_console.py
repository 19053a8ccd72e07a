"""What the console prints, in this process: the epoch line, the ETA and epoch count of runs
that train.max_steps ends early, the sync probe's schedule, the first header line."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from common.schema import DDPConfig, LogConfig
from train.dist import DistContext
from train.loop.parts import Schedule
from train.loop.probe import SyncProbe
from train.observe import console
from train.observe.console import Console, format_epoch
from train.observe.describe import describe
from train.strategies.base import Single
from train.strategies.ddp import DDP


def ctx(world_size: int, threads: int) -> DistContext:
    backend = "gloo" if world_size > 1 else "none"
    return DistContext(0, 0, world_size, world_size, torch.device("cpu"), backend, threads)


def schedule(steps_per_epoch: int, epochs: int, total: int | None = None,
             sync_probe: bool = True) -> Schedule:
    return Schedule(epochs=epochs, steps_per_epoch=steps_per_epoch,
                    total_steps=total or epochs * steps_per_epoch, global_batch=256,
                    grad_accum_steps=1, log_every=20, checkpoint_every=0, sync_probe=sync_probe)


RECORD = {"epoch": 2, "train_loss": 0.5, "train_accuracy": 0.8, "test_accuracy": 0.75,
          "epoch_time_s": 5.94, "eval_time_s": 0.31, "probe_time_s": None,
          "samples_per_s": 4049.0, "time_data_ms": 0.5, "time_compute_ms": 52.4,
          "time_sync_ms": None, "time_optim_ms": 0.8}


def test_the_epoch_line_says_n_a_and_shows_evaluation_and_probe_apart():
    line = format_epoch(RECORD, 6)
    assert line.startswith("epoch 2/6  mean loss 0.5000  train acc 80.00%  test acc 75.00%")
    assert "train 5.9 s, eval 0.3 s  " in line and "probe" not in line
    assert line.endswith("step ms: data 0.5, compute 52.4, sync n/a, optim 0.8")
    probed = format_epoch({**RECORD, "probe_time_s": 0.12, "time_sync_ms": 8.94}, 6)
    assert "train 5.9 s, eval 0.3 s, sync probe 0.1 s" in probed and "sync 8.9," in probed


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("total, epochs_shown, eta", [
    (4, 1, "eta 0:00:10"),  # max_steps=4 inside a 93-step epoch: its 4 steps, not 93
    (8, 2, "eta epoch 0:00:10, run 0:00:30"),  # the run ends 4 steps into epoch 2
])
def test_the_epoch_count_and_eta_follow_the_real_end(monkeypatch, total, epochs_shown, eta):
    clock = Clock()
    monkeypatch.setattr(console.time, "perf_counter", clock)
    plan = schedule(steps_per_epoch=93, epochs=6, total=total) if total == 4 else \
        schedule(steps_per_epoch=4, epochs=6, total=total)
    out = io.StringIO()
    shown = Console(LogConfig(progress="lines"), plan.epochs_in_run, plan.total_steps, out)
    shown.epoch_start(1, min(plan.steps_per_epoch, plan.total_steps), 0)
    for _ in range(2):
        shown.advance()
    clock.now = 10.0  # 2 steps in 10 s
    shown.log_step(2, {"loss": 2.3, "samples_per_s": 51.2})
    line = out.getvalue().strip()
    assert line.startswith(f"epoch 1/{epochs_shown} step 2/4  step loss 2.3000  51 samples/s")
    assert line.endswith(eta)


@pytest.mark.parametrize("columns", [80, 140])
def test_the_bar_keeps_the_loss_on_a_narrow_terminal(monkeypatch, columns):
    """The bar's fields, most telling first: 80 columns cut the end of the line, not the loss."""
    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.setattr(console.tqdm, "monitor_interval", 0)  # no monitor thread in a test
    out = io.StringIO()
    shown = Console(LogConfig(progress="bar"), epochs=3, total_steps=30, stream=out)
    shown.epoch_start(1, 10, 0)
    shown.advance()
    shown.log_step(1, {"loss": 2.3456, "samples_per_s": 1234.0})
    shown.advance()  # tqdm draws on update
    shown.bar.refresh()
    line = out.getvalue().split("\r")[-1].rstrip()
    assert len(line) <= columns and "loss=2.3456" in line
    if columns > 80:
        assert line.index("loss=") < line.index("samples/s=1,234") < line.index("run_eta=")
    shown.close()


def test_the_probe_runs_every_epoch_only_where_it_is_cheap():
    ddp = DDP(ctx(2, 1), DDPConfig())
    long = SyncProbe(ddp, schedule(steps_per_epoch=93, epochs=6), contextlib.nullcontext)
    assert long.skipped(whole=True) is None  # 2 passes are 2.2% of 93 steps
    long.probed = True
    assert long.skipped(whole=True) is None  # ... at every epoch end
    short = SyncProbe(ddp, schedule(steps_per_epoch=12, epochs=2), contextlib.nullcontext)
    assert short.skipped(whole=True) is None  # once per run ...
    short.probed = True
    assert short.skipped(whole=True).startswith("once per run: its 2 passes cost more than 3%")
    assert short.skipped(whole=False) == "a partial epoch"
    cut = SyncProbe(ddp, schedule(steps_per_epoch=93, epochs=6, total=4), contextlib.nullcontext)
    assert cut.skipped(whole=True) == "the run is shorter than one epoch"
    off = SyncProbe(ddp, schedule(steps_per_epoch=93, epochs=6, sync_probe=False),
                    contextlib.nullcontext)
    assert off.skipped(whole=True) == "log.sync_probe=false"


def test_thread_counts_read_as_counts():
    assert describe(Single(ctx(1, 2))) == "one process on cpu, 2 threads"
    assert describe(Single(ctx(1, 1))) == "one process on cpu, 1 thread"
    assert describe(DDP(ctx(2, 1), DDPConfig())) == "2 x cpu (gloo), 1 thread each"
