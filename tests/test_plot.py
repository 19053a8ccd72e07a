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
def runs(plain_runs) -> list[Path]:
    """Two real runs of 2 epochs: 2 CPU workers, and 1 worker (tests/conftest.py: shared with
    the other tests that only read what a plain run leaves)."""
    return plain_runs


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
        # Two workers: epoch 1 has the probe's sync estimate, epoch 2 (partial: max_steps=8)
        # does not: the bars average the epochs whose sync is known, where it is not inside
        # compute. One worker has nothing to sync (n/a in every epoch): all epochs count.
        known = [r["time_sync_ms"] is not None for r in records]
        assert known == ([False, False] if records[0]["world_size"] == 1 else [True, False])
        heights = [b.get_height() for b in bars[i * len(PHASES):(i + 1) * len(PHASES)]]
        averaged = records[:1] if any(known) else records
        want = [statistics.fmean(r[f"time_{p}_ms"] or 0.0 for r in averaged) for p in PHASES]
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
        # the epochs with a sync time, where some have one (else the sync counts twice)
        records = [r for r in records if r["time_sync_ms_ranks"] is not None] or records
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


def test_the_rank_legend_covers_no_bar(tmp_path):
    """Rank 0 the tallest, as a straggler's would be: the phase legend stands beside the
    panels, clear of every bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    run = tmp_path / "ranks"
    run.mkdir()
    phases = {"data": [1.0, 1.0], "compute": [30.0, 10.0], "sync": [1.0, 21.0],
              "optim": [2.0, 2.0]}
    record = {"epoch": 1, "train_loss": 2.0, "train_accuracy": 0.3, "test_accuracy": 0.35,
              "world_size": 2, "mode": "ddp", "time_step_ms_ranks": [34.0, 34.0],
              **{f"time_{p}_ms_ranks": v for p, v in phases.items()}}
    (run / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    fig = plot_rank_step_time(load_runs([str(run)]))
    renderer = FigureCanvasAgg(fig).get_renderer()
    [legend] = fig.legends
    box = legend.get_window_extent(renderer)
    bars = [p for ax in fig.axes for p in ax.patches]
    assert len(bars) == 8
    assert not any(box.overlaps(b.get_window_extent(renderer)) for b in bars)
    assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)
    assert box.x1 <= fig.bbox.width


def test_bench_scaling_of_one_worker_count_is_drawn_on_whole_workers():
    """`make bench` with one worker count: one tick at 1 worker (not 0.945-1.050), and a
    samples/s axis that does not blow 990 vs 1000 up to the full height."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from tools.bench.report import bench_figure

    rows = [{"bytes": b, **{n: {"busbw_GBps": 0.5} for n in ("torch", "ring", "naive")}}
            for b in (2**10, 2**20)]
    fig = bench_figure({
        "scaling": {"ddp": {1: {"samples_per_s": 1000.0}},
                    "scratch": {1: {"samples_per_s": 990.0}}},
        "allreduce": {"rows": rows}, "peers": {}, "overhead": {"ratio_ours_over_minimal": 1.02},
        "resnet_sync": dict.fromkeys(("torch_per_parameter", "torch_flat", "ring_per_parameter",
                                      "ring_bucketed_25mb"), 0.05)})
    FigureCanvasAgg(fig).draw()
    scaling, allreduce = fig.axes[0], fig.axes[1]
    low, high = scaling.get_xlim()
    assert (low, high) == (0.5, 1.5)
    assert [t for t in scaling.get_xticks() if low <= t <= high] == [1.0]
    assert scaling.get_ylim()[0] < 990 - 40 and scaling.get_ylim()[1] > 1000 + 40
    widths = [line.get_linewidth() for line in allreduce.get_lines()]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == 3  # none hidden
    assert fig.axes[3].get_ylim()[1] > 1.1  # the ratio labels above the 1.0 line
