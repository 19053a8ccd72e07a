"""TensorBoard (`log.tensorboard`): the scalars wandb gets, as event files in run.dir/tensorboard,
from the main worker only. For clusters without wandb access: `tensorboard --logdir runs`.

The tags are wandb's: `train/<key>` every `log.every_steps` steps, `epoch/<key>` for each
number of an epoch record, both at the optimizer step. A resumed run appends a new event file
to the same folder; TensorBoard shows the repeated steps after the last checkpoint as the
newer values.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
TENSORBOARD_DIR = "tensorboard"


def epoch_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The epoch record's numbers under their tags (wandb logs the same)."""
    return {f"epoch/{k}": float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    """A monitor sink writing step and epoch scalars with torch's SummaryWriter."""

    def __init__(self, folder: Path):
        self.folder = folder / TENSORBOARD_DIR
        self.writer: Any = None

    def start(self) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(self.folder))
        log.info("tensorboard: %s (tensorboard --logdir %s)", self.folder, self.folder)

    def epoch_start(self, epoch: int, steps: int, done: int) -> None:
        pass

    def advance(self) -> None:
        pass

    def log_step(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"train/{key}", value, step)

    def log_epoch(self, record: dict[str, Any]) -> None:
        for tag, value in epoch_scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])
        self.writer.flush()  # an epoch's figures are on disk when it ends

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
