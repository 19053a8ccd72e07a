"""`python -m train.plot` on run folders made by the real launcher."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import REPO, run_cli
from tools.plot import PHASES, load_runs, plot_curves, plot_step_time
from tools.plot_ranks import plot_rank_step_time

CONFIG = str(REPO / "configs" / "default.yaml")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def runs(launched_runs) -> list[Path]:
    """Two real runs of 2 epochs: 2 CPU workers, and 1 worker (tests/conftest.py: shared with
    the other tests that only read what a plain run leaves)."""
    return launched_runs


@pytest.mark.slow
def test_cli_writes_pngs_into_the_first_run(runs):
    result = run_cli("tools.plot", *map(str, runs))
    assert result.returncode == 0, result.stderr
    written = [runs[0] / "plots" / name
               for name in ("curves.png", "step_time.png", "step_time_ranks.png")]
    assert result.stdout.split() == [str(p) for p in written]
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width >= 600 and image.height >= 400


@pytest.mark.slow
def test_out_folder(runs, tmp_path):
    result = run_cli("tools.plot", str(runs[1]), "--out", str(tmp_path / "figs"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == [
        "curves.png", "step_time.png", "step_time_ranks.png"]


@pytest.mark.slow
def test_curves_show_each_runs_metrics(runs):
    fig = plot_curves(load_runs([str(r) for r in runs]))
    loss_ax = fig.axes[0]
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    legend = [t.get_text() for t in loss_ax.get_legend().get_texts()]
    for run_dir, workers in zip(runs, ("2 workers", "1 worker"), strict=True):
        label = f"{run_dir.name} (ddp, {workers})"
        assert label in legend
        records = read_metrics(run_dir)
        assert len(records) == 2
        for suffix, key in (("", "train_loss"), (": train acc", "train_accuracy"),
                            (": test acc", "test_accuracy")):
            line = lines[label + suffix]
            assert list(line.get_xdata()) == [r["epoch"] for r in records]
            assert list(line.get_ydata()) == [r[key] for r in records]


@pytest.mark.slow
def test_step_time_bars_are_the_mean_phase_times(runs):
    fig = plot_step_time(load_runs([str(r) for r in runs]))
    ax = fig.axes[0]
    bars = [p for p in ax.patches if p.get_width() == pytest.approx(0.6)]
    assert len(bars) == len(PHASES) * len(runs)
    texts = [t.get_text() for t in ax.texts]
    for i, run_dir in enumerate(runs):
        records = read_metrics(run_dir)
        # Epoch 1 has the probe's sync estimate, epoch 2 (partial: max_steps=8) does not: the
        # bars average the epochs whose sync is known, where it is not inside compute.
        assert [r["time_sync_ms"] is None for r in records] == [False, True]
        heights = [b.get_height() for b in bars[i * len(PHASES):(i + 1) * len(PHASES)]]
        want = [statistics.fmean(r[f"time_{p}_ms"] for r in records[:1]) for p in PHASES]
        assert heights == pytest.approx(want)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert f"{summary['samples_per_s']:,.0f} samples/s" in texts
    note = " ".join(" ".join(t.get_text().split()) for t in fig.texts)
    first, second = (r["sync_method"] for r in read_metrics(runs[0]))
    assert f"{runs[0].name}: sync epoch 1: {first} epoch 2: {second}" in note
    assert "a partial epoch" in second


@pytest.mark.slow
def test_the_footnote_fits_the_figure(runs):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = plot_step_time(load_runs([str(r) for r in runs]))
    fig.set_dpi(110)  # the PNGs' resolution: glyph widths depend on it
    renderer = FigureCanvasAgg(fig).get_renderer()
    [note] = fig.texts
    assert note.get_window_extent(renderer).x1 <= fig.bbox.width


def test_one_epoch_is_drawn_on_whole_epochs(tmp_path):
    run = tmp_path / "one"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps(
        {"epoch": 1, "train_loss": 2.0, "train_accuracy": 0.3, "test_accuracy": 0.35,
         "time_sync_ms": None, "sync_method": "none: one process"}) + "\n")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = plot_curves(load_runs([str(run)]))
    FigureCanvasAgg(fig).draw()
    for ax in fig.axes:
        low, high = ax.get_xlim()
        assert (low, high) == (0.5, 1.5)
        assert [t for t in ax.get_xticks() if low <= t <= high] == [1.0]


@pytest.mark.slow
def test_each_ranks_step_time_stands_side_by_side(runs):
    fig = plot_rank_step_time(load_runs([str(r) for r in runs]))
    for ax, run_dir, ranks in zip(fig.axes, runs, (2, 1), strict=True):
        records = read_metrics(run_dir)
        bars = [p for p in ax.patches if p.get_width() == pytest.approx(0.6)]
        assert len(bars) == len(PHASES) * ranks
        for i, phase in enumerate(PHASES):
            heights = [b.get_height() for b in bars[i * ranks:(i + 1) * ranks]]
            # A run shorter than an epoch never probes DDP's sync: null, drawn as 0.
            known = [r[f"time_{phase}_ms_ranks"] for r in records
                     if r[f"time_{phase}_ms_ranks"] is not None]
            want = ([statistics.fmean(v[k] for v in known) for k in range(ranks)] if known
                    else [0.0] * ranks)
            assert heights == pytest.approx(want)
        assert [t.get_text() for t in ax.get_xticklabels()] == [f"rank {k}" for k in
                                                                 range(ranks)]


@pytest.mark.slow
def test_the_records_per_rank_agree_with_their_mean_and_max(runs):
    for record in read_metrics(runs[0]):
        for key in [f"time_{p}_ms" for p in PHASES] + ["peak_memory_mb"]:
            ranks = record[f"{key}_ranks"]
            if key == "time_sync_ms" and record[key] is None:  # not measured (no DDP probe)
                assert ranks is None and record[f"{key}_max"] is None
                continue
            assert len(ranks) == record["world_size"] == 2
            assert record[key] == pytest.approx(statistics.fmean(ranks))
            assert record[f"{key}_max"] == max(ranks)
        assert record["time_step_ms_max"] == max(record["time_step_ms_ranks"])


# One real command line; every case in process: tests/unit/test_bad_input.py.
@pytest.mark.slow
@pytest.mark.parametrize("setup, message", [
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("{oops\n")), "not valid JSON"),
], ids=["bad-json"])
def test_bad_run_is_one_line_and_exit_2(tmp_path, setup, message):
    run_dir = tmp_path / "run"
    setup(run_dir)
    result = run_cli("tools.plot", str(run_dir))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr and str(run_dir) in result.stderr
