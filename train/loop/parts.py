"""The small records a Trainer is handed: its position, its schedule, its guards, and the
bundle of built parts (train/worker.py builds them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from train.data.batches import Batches
from train.data.build import DataFacts
from train.data.counters import DataCounters
from train.data.stream import StreamBatches
from train.loop.faults import Faults
from train.loop.guards import SampleLedger, StopRequest, SyncChecker
from train.loop.metrics import EpochTotals
from train.loop.regularize import Criterion, Mixing, ModelEma
from train.observe.monitor import Monitor
from train.observe.profile import NoProfiler
from train.optim import Optimization
from train.run.checkpoint import Checkpointer
from train.run.folder import RunFolder
from train.run.hang import HangRecorder, NoHangRecord
from train.strategies.base import Strategy


@dataclass(kw_only=True, slots=True)
class TrainState:
    """The position in the run; a checkpointed part."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    batch_in_epoch: int = 0  # optimizer steps completed inside the current epoch
    # Not saved by this part: the workers that wrote the checkpoint resumed from (the
    # checkpointer saves it), to tell a resume at another world size.
    saved_world_size: int | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.step = state["epoch"], state["step"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.saved_world_size = state.get("world_size")  # the file's top level (flat part)

    def end_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0

    def world_size_change(self, world_size: int) -> dict[str, int] | None:
        """{"step", "from", "to"} when the run resumed a checkpoint of another world size (an
        elastic job whose nodes changed, or checkpoint.allow_changes)."""
        if self.saved_world_size in (None, world_size):
            return None
        return {"step": self.step, "from": self.saved_world_size, "to": world_size}


@dataclass(frozen=True, kw_only=True, slots=True)
class Schedule:
    """How long the run is and how often it logs and checkpoints."""

    epochs: int
    steps_per_epoch: int
    total_steps: int  # the epochs' steps, or train.max_steps when smaller
    global_batch: int
    grad_accum_steps: int
    log_every: int
    checkpoint_every: int  # 0: at epoch ends only
    sync_probe: bool = True  # log.sync_probe: DDP's sync probe allowed at epoch ends

    @property
    def cut_by_max_steps(self) -> bool:
        """train.max_steps ends the run before its last epoch does."""
        return self.total_steps < self.epochs * self.steps_per_epoch

    @property
    def epochs_in_run(self) -> int:
        """The epochs that will run: fewer than `epochs` when train.max_steps ends it early."""
        return min(self.epochs, -(-self.total_steps // self.steps_per_epoch))


@dataclass(kw_only=True, slots=True)
class Guards:
    stop: StopRequest
    sync_check: SyncChecker
    ledger: SampleLedger
    faults: Faults
    timeout_s: float  # dist.timeout_s, named when a collective fails
    hang: HangRecorder = field(default_factory=NoHangRecord)  # where this rank was, if hung


@dataclass(kw_only=True, slots=True)
class TrainerParts:
    """Everything a Trainer is handed, built: each part under one name (the Trainer reads
    `parts.<name>`, copying none)."""

    strategy: Strategy
    plain: nn.Module  # the model itself: saved, evaluated, checked
    model: nn.Module  # what trains: wrapped by the strategy, maybe compiled
    compiled: bool
    channels_last: bool
    train_data: Batches | StreamBatches
    test_data: Batches | StreamBatches
    optim: Optimization
    state: TrainState
    totals: EpochTotals
    guards: Guards
    schedule: Schedule
    run: RunFolder
    monitor: Monitor
    checkpointer: Checkpointer
    counters: DataCounters  # per-epoch data counts (skipped files), summed into the record
    data: DataFacts  # shape, classes, path
    criterion: Criterion  # the loss (label smoothing) and what counts as correct
    mixing: Mixing  # mixup / CutMix of each step's batch (or nothing)
    ema: ModelEma | None  # the weights' moving average (train.ema_decay)
    profiler: NoProfiler = field(default_factory=NoProfiler)  # perf.profile_steps
    labels: dict[str, str] = field(default_factory=dict)  # what summary.json names: model, data
