"""Fans the loop's events out to the main worker's sinks (console, wandb).

Other ranks get `Monitor([])`: every call does nothing, and the loop never asks which rank it
is on.
"""

from __future__ import annotations

from typing import Any, Protocol


class Sink(Protocol):
    def start(self) -> None: ...
    def epoch_start(self, epoch: int, steps: int, done: int) -> None: ...
    def advance(self) -> None: ...
    def log_step(self, step: int, values: dict[str, float]) -> None: ...
    def log_epoch(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class Monitor:
    def __init__(self, sinks: list[Sink]):
        self.sinks = list(sinks)

    def start(self) -> None:
        """Once, when training starts (after a resume has restored the sinks' state)."""
        for sink in self.sinks:
            sink.start()

    def epoch_start(self, epoch: int, steps: int, done: int) -> None:
        for sink in self.sinks:
            sink.epoch_start(epoch, steps, done)

    def advance(self) -> None:
        for sink in self.sinks:
            sink.advance()

    def log_step(self, step: int, values: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log_step(step, values)

    def log_epoch(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log_epoch(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
