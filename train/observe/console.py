"""The main worker's console: a progress bar on a terminal, plain lines elsewhere, and one line
per epoch."""

from __future__ import annotations

import shutil
import sys
import time
from typing import Any

from tqdm import tqdm

from common.records import PHASES
from common.schema import LogConfig


class Console:
    """A tqdm bar per epoch on a terminal; plain lines every `log.every_steps` steps elsewhere
    (CI, SLURM logs), where a bar would print thousands of carriage returns.

    `epochs` and `total_steps` are where the run really ends (train.max_steps included): the
    epoch counter and the ETA follow them."""

    def __init__(self, cfg: LogConfig, epochs: int, total_steps: int, stream: Any = None):
        self.stream = stream or sys.stdout
        mode = cfg.progress
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode, self.epochs, self.total_steps = mode, epochs, total_steps
        self.bar: tqdm | None = None
        self.epoch, self.steps, self.done = 0, 0, 0
        self.started = time.perf_counter()

    def start(self) -> None:
        pass

    def epoch_start(self, epoch: int, steps: int, done: int) -> None:
        self.epoch, self.steps, self.done = epoch, steps, done
        self.started = time.perf_counter()
        self.done_at_start = done
        if self.mode == "bar":
            # A terminal that reports a 0x0 size (a fresh pty, some CI runners) would get no
            # bar at all from tqdm: fall back to 100x20.
            size = shutil.get_terminal_size((100, 20))
            self.bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch}/{self.epochs}",
                            unit="step", file=self.stream, leave=False, ncols=size.columns,
                            nrows=size.lines)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def log_step(self, step: int, values: dict[str, float]) -> None:
        """`step`: optimizer steps done in the run; `values["loss"]`: this step's loss."""
        epoch_left, run_left = self._eta(step)
        if self.bar is not None:
            # Most telling first (tqdm would sort keyword arguments): a narrow terminal cuts
            # the end of the line, and the loss must survive an 80-column one.
            postfix = {"loss": f"{values['loss']:.4f}",
                       "samples/s": f"{values['samples_per_s']:,.0f}"}
            if self.epochs > 1:
                postfix["run_eta"] = _clock(run_left)
            self.bar.set_postfix(postfix, refresh=False)
        elif self.mode == "lines":
            eta = _clock(epoch_left)
            if self.epochs > 1:
                eta = f"epoch {eta}, run {_clock(run_left)}"
            norm = f"  grad norm {values['grad_norm']:.3f}" if "grad_norm" in values else ""
            print(f"epoch {self.epoch}/{self.epochs} step {self.done}/{self.steps}  "
                  f"step loss {values['loss']:.4f}{norm}  {values['samples_per_s']:,.0f} "
                  f"samples/s  eta {eta}", file=self.stream, flush=True)

    def _eta(self, step: int) -> tuple[float, float]:
        """Seconds of steps left in this epoch and in the run, at this epoch's pace so far
        (evaluation not included)."""
        elapsed = time.perf_counter() - self.started
        rate = (self.done - self.done_at_start) / elapsed if elapsed > 0 else 0.0
        if rate <= 0:
            return 0.0, 0.0
        return (self.steps - self.done) / rate, max(0, self.total_steps - step) / rate

    def log_epoch(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        print(format_epoch(record, self.epochs), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_epoch(record: dict[str, Any], epochs: int) -> str:
    """The epoch's line: its mean training loss, accuracies, where its time went (training
    steps, evaluation, the sync probe) and the mean step's phases (n/a: not measured)."""
    spent = [f"train {record['epoch_time_s']:.1f} s"]
    if record.get("eval_time_s") is not None:
        spent.append(f"eval {record['eval_time_s']:.1f} s")
    if record.get("probe_time_s") is not None:
        spent.append(f"sync probe {record['probe_time_s']:.1f} s")
    times = ", ".join(f"{p} {_ms(record[f'time_{p}_ms'])}" for p in PHASES)
    ema = f" (EMA {record['test_accuracy_ema']:.2%})" if "test_accuracy_ema" in record else ""
    return (f"epoch {record['epoch']}/{epochs}  mean loss {record['train_loss']:.4f}  "
            f"train acc {record['train_accuracy']:.2%}  test acc {record['test_accuracy']:.2%}"
            f"{ema}  {record['samples_per_s']:,.0f} samples/s  {', '.join(spent)}  "
            f"step ms: {times}")


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
