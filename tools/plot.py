"""`python -m tools.plot RUN [RUN ...] [--out DIR]`: PNGs of one or several run folders.

- `curves.png`: train loss, train accuracy and test accuracy per epoch, one colour per run
  (the plots of Dive into Deep Learning's training chapters);
- `step_time.png`: milliseconds per step spent waiting for data, in forward+backward, in
  gradient sync and in the optimizer, as stacked bars (mean over ranks, averaged over epochs),
  with the slowest rank marked and samples/s above each bar; a note says how each run's sync
  time was obtained;
- `step_time_ranks.png`: the same breakdown for each rank side by side, one panel per run
  (`time_<phase>_ms_ranks`): a straggler is the rank with the most time outside the sync, and
  the others' longer sync is their wait for it.

Everything is read from the run folders (`metrics.jsonl`, `summary.json`, `config.yaml`);
nothing is recomputed. The default output folder is `<first RUN>/plots/`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure  # no pyplot: no display, no global figure registry
from matplotlib.lines import Line2D

from common.errors import EXIT_USER_ERROR, UserError
from common.records import PHASES
from tools.axes import epoch_axis, value_axis
from tools.plot_ranks import PHASE_COLORS, plot_rank_step_time
from train.run.location import follow_latest

SLOWEST = "slowest rank's\nwhole step"
DPI = 110  # the PNGs' resolution
REQUIRED = ("epoch", "train_loss", "train_accuracy", "test_accuracy")


@dataclass
class Run:
    """One run folder as read from disk: its name, how it ran, and one record per epoch."""

    path: Path
    name: str
    mode: str
    world_size: int
    records: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        workers = "worker" if self.world_size == 1 else "workers"
        return f"{self.name} ({self.mode}, {self.world_size} {workers})"

    def series(self, key: str) -> list[float]:
        """One value per epoch (NaN where an epoch lacks the key or holds null: n/a)."""
        return [math.nan if r.get(key) is None else float(r[key]) for r in self.records]


def load_run(path: str | Path) -> Run:
    """Read a run folder (`runs/latest`: the newest run); a folder that is missing or holds no
    epoch yet is a UserError."""
    folder = follow_latest(Path(path))
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise UserError(f"run folder {folder} {what}")
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{folder} has no metrics.jsonl (not a run folder, or no epoch finished)")
    records = _read_records(metrics)
    config = _read_mapping(folder / "config.yaml", yaml.safe_load)
    summary = _read_mapping(folder / "summary.json", json.loads)
    last = records[-1]
    name = (config.get("run") or {}).get("name") or folder.resolve().name
    mode = str(last.get("mode") or config.get("mode") or "?")
    world_size = int(last.get("world_size") or summary.get("world_size") or 1)
    return Run(folder, str(name), mode, world_size, records, summary)


def load_runs(paths: list[str]) -> list[Run]:
    """Several runs; runs that share a name (default folders of one config) are told apart by
    their folder's name, or by its whole path where those are alike too."""
    runs = [load_run(p) for p in paths]
    names = [r.name for r in runs]
    folders = [r.path.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = run.path.name if folders.count(run.path.name) == 1 else str(run.path)
    return runs


def _read_records(metrics: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(metrics.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{metrics}: line {number} is not valid JSON") from None
        missing = [k for k in REQUIRED if not isinstance(record, dict) or k not in record]
        if missing:
            raise UserError(f"{metrics}: line {number} lacks {', '.join(missing)}")
        records.append(record)
    if not records:
        raise UserError(f"{metrics} is empty: the run has not finished an epoch yet")
    return records


def _read_mapping(path: Path, parse) -> dict[str, Any]:
    """config.yaml and summary.json only add names and throughput: unreadable means absent."""
    try:
        value = parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}


# --- figures ---------------------------------------------------------------------------------


def plot_curves(runs: list[Run]) -> Figure:
    """Loss (left) and accuracy (right) per epoch; colour = run, line style = what."""
    fig = Figure(figsize=(11, 4.2))
    loss_ax, acc_ax = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        epochs = run.series("epoch")
        # Runs with the same global batch should coincide (that is the point of data
        # parallelism): earlier runs are drawn wider, so one never hides another.
        style = {"color": f"C{i % 10}", "lw": 1.5 + 2.0 * (len(runs) - 1 - i), "alpha": 0.85,
                 "ms": 3 + 2 * (len(runs) - 1 - i)}
        loss_ax.plot(epochs, run.series("train_loss"), marker="o", label=run.label, **style)
        acc_ax.plot(epochs, run.series("train_accuracy"), ls="--", marker="o",
                    label=f"{run.label}: train acc", **style)
        acc_ax.plot(epochs, run.series("test_accuracy"), ls="-", marker="s",
                    label=f"{run.label}: test acc", **style)
    losses = [v for run in runs for v in run.series("train_loss")]
    value_axis(loss_ax, losses, least=0.1 * max([abs(v) for v in losses if v == v] + [0.01]))
    loss_ax.set(xlabel="epoch", ylabel="train loss", title="train loss")
    loss_ax.legend(fontsize=8)
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    # Runs are told apart by colour on the left; here only the line style needs a key.
    styles = [Line2D([], [], color="black", ls="--", marker="o", ms=3, label="train acc"),
              Line2D([], [], color="black", ls="-", marker="s", ms=3, label="test acc")]
    acc_ax.legend(handles=styles, fontsize=8, loc="lower right")
    last = max(int(max(run.series("epoch"))) for run in runs)
    for ax in (loss_ax, acc_ax):
        epoch_axis(ax, last)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def step_times(run: Run) -> tuple[dict[str, float], float, bool]:
    """Per-phase ms per step (mean over ranks, averaged over epochs), the slowest rank's whole
    step (`time_step_ms_max`) averaged alike, and whether the sync time is known.

    Where only some epochs have a sync time (DDP's probe ran once per run), only those are
    averaged: in the others the sync is inside compute, and mixing them would count it twice
    or not at all."""
    known = [r for r in run.records if r.get("time_sync_ms") is not None]
    chosen = Run(run.path, run.name, run.mode, run.world_size, known or run.records)
    means = {p: _mean(chosen.series(f"time_{p}_ms")) for p in PHASES}
    return means, _mean(chosen.series("time_step_ms_max")), bool(known)


def samples_per_s(run: Run) -> float:
    """The run's own figure from summary.json; else the mean over epochs."""
    return float(run.summary.get("samples_per_s") or _mean(run.series("samples_per_s")))


def sync_methods(run: Run) -> list[tuple[str, str]]:
    """(epochs, how the sync time was obtained) for each way a run's epochs recorded it."""
    epochs: dict[str, list[int]] = {}
    for r in run.records:
        epochs.setdefault(str(r.get("sync_method") or "not recorded"), []).append(r["epoch"])
    return [(_epochs(numbers), method) for method, numbers in epochs.items()]


def _epochs(numbers: list[int]) -> str:
    """[1] -> 'epoch 1'; [2, 3, 4] -> 'epochs 2-4'; [1, 3] -> 'epochs 1, 3'."""
    if len(numbers) == 1:
        return f"epoch {numbers[0]}"
    run = numbers == list(range(numbers[0], numbers[-1] + 1))
    return f"epochs {numbers[0]}-{numbers[-1]}" if run else f"epochs {', '.join(map(str, numbers))}"


def sync_note(runs: list[Run], chars: int) -> str:
    """The footnote: per run, how its sync time was obtained, wrapped to `chars` columns."""
    lines = []
    for run in runs:
        if len(methods := sync_methods(run)) == 1:
            lines.append(textwrap.fill(f"{run.name}: sync {methods[0][1]}", chars,
                                       subsequent_indent="    "))
            continue
        lines.append(f"{run.name}: sync")
        lines += [textwrap.fill(f"{epochs}: {method}", chars, initial_indent="    ",
                                subsequent_indent="        ") for epochs, method in methods]
    return "\n".join(lines)


def _monospace_char_inches(fontsize: float) -> float:
    """The width of one monospace glyph at `fontsize`, as this matplotlib renders it at the
    PNGs' resolution (hinting rounds glyph advances to whole pixels: the width depends on it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(dpi=DPI)
    text = fig.text(0, 0, "M" * 50, fontsize=fontsize, family="monospace")
    width_px = text.get_window_extent(FigureCanvasAgg(fig).get_renderer()).width
    return width_px / 50 / fig.dpi


def plot_step_time(runs: list[Run]) -> Figure:
    """Stacked ms per step per run, the max-over-ranks total marked, samples/s on top."""
    width = max(8.0, 4.5 + 1.8 * len(runs))
    # Wrapped to the glyphs' measured width, with a margin on both sides.
    note = sync_note(runs, int((width - 0.3) / _monospace_char_inches(7)))
    note_lines = note.count("\n") + 1
    height = 4.6 + 0.14 * note_lines
    fig = Figure(figsize=(width, height))
    ax = fig.subplots()
    tops, labels = [], []
    for x, run in enumerate(runs):
        means, worst, sync_known = step_times(run)
        labels.append(textwrap.fill(run.label, 22) + ("" if sync_known else "\nsync n/a"))
        bottom = 0.0
        for phase in PHASES:
            ax.bar(x, means[phase], 0.6, bottom=bottom, color=PHASE_COLORS[phase],
                   label=phase if x == 0 else "_nolegend_")
            bottom += means[phase]
        ax.plot([x - 0.38, x + 0.38], [worst, worst], color="black", ls="--", lw=1.2,
                label=SLOWEST if x == 0 else "_nolegend_")
        top = max(bottom, worst)
        tops.append(top)
        ax.annotate(f"{samples_per_s(run):,.0f} samples/s", (x, top), xytext=(0, 4),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(runs)), labels, fontsize=8)
    for i, tick in enumerate(ax.get_xticklabels()):
        tick.set_color(f"C{i % 10}")  # the run's colour in curves.png
    ax.set_xlim(-0.7, len(runs) - 0.3)
    ax.set_ylim(0, 1.15 * max(tops + [1e-3]))
    ax.set(ylabel="ms per step (mean over ranks, averaged over epochs)",
           title="step time: data / compute / sync / optim")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="y", alpha=0.3)
    fig.text(0.01, 0.01, note, ha="left", va="bottom", fontsize=7, family="monospace")
    fig.tight_layout(rect=(0, (0.2 + 0.14 * note_lines) / height, 1, 1))
    return fig


def _mean(values: list[float]) -> float:
    present = [v for v in values if not math.isnan(v)]
    return statistics.fmean(present) if present else 0.0


def write_plots(runs: list[Run], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in (("curves.png", plot_curves), ("step_time.png", plot_step_time),
                       ("step_time_ranks.png", plot_rank_step_time)):
        path = out / name
        make(runs).savefig(path, dpi=DPI)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.plot",
                                     description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (run.dir)")
    parser.add_argument("--out", default=None, help="output folder (default: <first RUN>/plots)")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.runs)
        out = Path(args.out) if args.out else runs[0].path / "plots"
        try:
            written = write_plots(runs, out)
        except OSError as exc:
            raise UserError(f"cannot write the plots into {out}: {exc.strerror or exc}") from None
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
