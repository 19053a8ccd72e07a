"""`checkpoint.keep_best`: the checkpoint of the best epoch so far stays beside the newest ones.

At each epoch's end the epoch record (already reduced over ranks) is ranked by
`checkpoint.best_metric`; the checkpoint written right after it (the epoch's own step file) is
linked as `checkpoints/best.pt` (a hard link, as last.pt is) and described in
`checkpoints/best.json`. Rotation (`checkpoint.keep`) never removes the best step's file, so
mode fsdp's DCP folder beside it stays too. The best value and step are a checkpointed part:
a resumed run goes on comparing with the best epoch of the run so far, and relinks best.pt
when a crash came between a checkpoint and its link.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from common.files import atomic_write
from common.records import BEST_FILE, BEST_METRICS, BEST_RECORD

log = logging.getLogger(__name__)


def direction(metric: str, mode: str) -> str:
    return BEST_METRICS[metric] if mode == "auto" else mode


class BestKeeper:
    """Ranks epochs (a monitor sink on the main worker) and keeps the best one's checkpoint
    (called by the checkpoint files after each write). Its state is a checkpointed part."""

    def __init__(self, metric: str, mode: str, folder: Path):
        self.metric, self.mode, self.folder = metric, direction(metric, mode), folder
        self.value: float | None = None
        self.step: int | None = None  # the best epoch's checkpoint step
        self.epoch: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "value": self.value,
                "step": self.step, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("metric") != self.metric or state.get("mode") != self.mode:
            log.info("checkpoint.best_metric changed (%s %s -> %s %s): the best epoch is "
                     "ranked anew from here", state.get("mode"), state.get("metric"),
                     self.mode, self.metric)
            return
        self.value, self.step, self.epoch = state["value"], state["step"], state["epoch"]

    def better(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.value is None:
            return True
        return value > self.value if self.mode == "max" else value < self.value

    def log_epoch(self, record: dict[str, Any]) -> None:
        value = record.get(self.metric)
        if value is not None and self.better(float(value)):
            self.value, self.step, self.epoch = float(value), record["step"], record["epoch"]

    def protected(self) -> str | None:
        """The step file rotation must keep."""
        return None if self.step is None else f"step_{self.step:08d}.pt"

    def after_save(self, link: Any) -> None:
        """Point best.pt at the best step's file when it does not already (`link(src, dst)`
        makes the hard link, or a copy)."""
        name = self.protected()
        if name is None or not (self.folder / name).is_file():
            return
        record_path = self.folder / BEST_RECORD
        record = {"metric": self.metric, "mode": self.mode, "value": self.value,
                  "epoch": self.epoch, "step": self.step, "file": name}
        try:
            if json.loads(record_path.read_text()) == record:
                return
        except (OSError, ValueError):
            pass
        atomic_write(self.folder / BEST_FILE, lambda p: link(self.folder / name, p))
        atomic_write(record_path, lambda p: p.write_text(json.dumps(record, indent=1) + "\n"))
        log.info("best epoch so far: %d (%s %.4g); %s -> %s", self.epoch, self.metric,
                 self.value, BEST_FILE, name)

    # The monitor's other events: nothing to do.
    def start(self) -> None:
        pass

    def epoch_start(self, epoch: int, steps: int, done: int) -> None:
        pass

    def advance(self) -> None:
        pass

    def log_step(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass
