"""`make compare` end to end on CPU workers: the report's files and figures, and fresh runs."""

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.helpers import run_cli
from tools.compare import default_workers

pytestmark = pytest.mark.slow
PATHS = ["ddp", "scratch naive", "dp"]
SMALL = ["data.synthetic.train_samples=1024", "data.synthetic.test_samples=301",
         "train.batch_size=64", "wandb.mode=disabled"]
ABSURD = 1e12  # samples/s no CPU reaches


def compare(out, paths: list[str], workers: str):
    done = run_cli("tools.compare", "--workers", workers, "--epochs", "2", "--paths",
                   ",".join(paths), "--out", str(out), *SMALL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "compare.json").read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One real comparison; the files are read at once (the last test runs compare again)."""
    out = tmp_path_factory.mktemp("compare")
    data = compare(out, PATHS, "1,2")
    rows = {(r["path"], r["workers"]): r for r in data["rows"]}
    return {"out": out, "json": data, "rows": rows, "md": (out / "compare.md").read_text()}


def test_report_has_every_path_and_worker_count(report):
    for name in ("compare.md", "compare.png", "compare.json"):
        assert (report["out"] / name).is_file(), name
    # dp is one process: on the CPU it runs once.
    assert sorted(report["rows"]) == sorted(
        [("ddp", 1), ("ddp", 2), ("scratch naive", 1), ("scratch naive", 2), ("dp", 1)])
    assert [r["path"] for r in report["json"]["rows"]] == ["ddp", "ddp", "scratch naive",
                                                         "scratch naive", "dp"]
    for run in report["json"]["runs"]:  # each trained both epochs, in this folder
        assert [r["epoch"] for r in run["records"]] == [1, 2], run["run_dir"]
    with Image.open(report["out"] / "compare.png") as png:
        assert png.format == "PNG"
        png.verify()


def test_figures(report):
    rows = report["rows"]
    for path in PATHS:
        assert rows[(path, 1)]["speedup"] == 1.0
    assert rows[("scratch naive", 2)]["sync_ms_per_step"] > 0  # measured
    assert rows[("dp", 1)]["sync_ms_per_step"] is None  # inside forward/backward
    dp_line = next(line for line in report["md"].splitlines() if line.startswith("| dp |"))
    assert dp_line.split("|")[5].strip() == "n/a"
    # Same math (sum of the two workers' gradients) through DDP and our naive allreduce.
    assert rows[("ddp", 2)]["test_accuracy"] == rows[("scratch naive", 2)]["test_accuracy"]


def test_the_report_names_every_change_to_the_config_and_its_method(report):
    changes = report["json"]["config_changes"]
    for change in ("train.epochs=2 (config: 6)", "train.batch_size=64 (config: 256)",
                   "data.synthetic.train_samples=1024 (config: 24000)",
                   "dist.cpu_threads=1 (config: 0)", "checkpoint.resume=False (config: True)",
                   "wandb.mode=disabled (config: auto)"):
        assert change in changes, changes
    assert len(changes) == 8, changes  # those, test_samples, and dist.device=cpu (--cpu)
    assert ", ".join(changes) in report["md"]
    # 2 epochs: the second one's figures, not "the median over the epochs after the first"
    assert "the second epoch (the first is warm-up)" in report["md"]
    assert "median" not in report["json"]["methods"]["samples/s"]
    # 16-step epochs: DDP's probe ran once (epoch 1), and that is the figure shown
    ddp = next(r for r in report["json"]["runs"] if (r["path"], r["workers"]) == ("ddp", 2))
    assert [r["time_sync_ms"] is not None for r in ddp["records"]] == [True, False]
    assert report["rows"][("ddp", 2)]["sync_ms_per_step"] == ddp["records"][0]["time_sync_ms"]


def test_cpu_workers_get_one_thread_each(report):
    for run in report["json"]["runs"]:
        cfg = yaml.safe_load((Path(run["run_dir"]) / "config.yaml").read_text())
        assert cfg["dist"]["cpu_threads"] == 1, run["run_dir"]
    assert "one thread each" in report["json"]["note"]


def test_default_workers():
    assert default_workers(0, cpu=True) == "1,2"
    assert default_workers(1, cpu=False) == "1"  # not 2 on one GPU: the launcher refuses
    assert default_workers(4, cpu=False) == "1,4"
    assert default_workers(1, cpu=True) == "1,2"  # --cpu on a GPU machine


def test_compare_again_trains_again(report):
    # A finished run with the same config would be resumed ("nothing left to train") and its
    # metrics reported again: plant an absurd figure in one and compare it again (the run of
    # one worker: what is checked is compare's, not the workers').
    metrics = report["out"] / "runs" / "ddp-1" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    metrics.write_text("".join(json.dumps({**r, "samples_per_s": ABSURD}) + "\n"
                               for r in records))
    again = compare(report["out"], ["ddp"], "1")
    [run] = again["runs"]
    assert [r["epoch"] for r in run["records"]] == [1, 2]
    assert all(r["samples_per_s"] < ABSURD for r in run["records"])
    assert again["rows"][0]["samples_per_s"] < ABSURD


def test_failed_run_says_which_with_its_output(tmp_path):
    done = run_cli("tools.compare", "--paths", "ddp", "--workers", "1", "--out", str(tmp_path),
                   "train.batch_size=0", "wandb.mode=disabled")
    assert done.returncode == 1
    *tail, last = done.stderr.strip().splitlines()
    assert last.startswith("error: the ddp run with 1 worker(s) failed (exit 2)")
    assert any("train.batch_size must be positive" in line for line in tail)  # the run's own
    assert not (tmp_path / "compare.md").exists()


def test_every_option_of_the_command_says_what_it_does():
    import re

    done = run_cli("tools.compare", "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    for option in ("--config CONFIG", "--workers WORKERS", "--epochs EPOCHS", "--paths PATHS",
                   "--cpu", "--out OUT"):
        described = re.search(re.escape(option) + r" (\w.+?)(?= --|$)", text)
        assert described and len(described.group(1)) >= 10, f"{option}: no help text"
    assert re.search(r"key=value config overrides", text)


def test_one_epoch_of_runs_that_agree_is_drawn_on_readable_axes():
    """Seven runs of one epoch whose accuracies differ in the fourth decimal: whole epochs on
    x, a y span of at least 0.1 without an offset, and each series drawn wider than the next
    (none hides under another)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from tools.compare import Result, compare_figure

    results = [Result("ddp", w, "", [{"epoch": 1, "test_accuracy": 0.8504 + 0.0001 * w,
                                      "samples_per_s": 1000.0 * w}]) for w in range(1, 8)]
    fig = compare_figure(results)
    FigureCanvasAgg(fig).draw()
    accuracy = fig.axes[0]
    low, high = accuracy.get_xlim()
    assert (low, high) == (0.5, 1.5)
    assert [t for t in accuracy.get_xticks() if low <= t <= high] == [1.0]
    bottom, top = accuracy.get_ylim()
    assert top - bottom >= 0.1 and bottom <= 0.8505 and top >= 0.8511
    assert accuracy.yaxis.get_offset_text().get_text() == ""
    widths = [line.get_linewidth() for line in accuracy.get_lines()]
    sizes = [line.get_markersize() for line in accuracy.get_lines()]
    assert len(widths) == 7 and widths == sorted(widths, reverse=True)
    assert len(set(widths)) == 7 and len(set(sizes)) == 7
