"""What a run shows and records: wandb, the console, the step-time breakdown, the ledger.

The runs whose lines and records come from the workers alone are the workers' own `main` in
gloo processes forked by the harness (`tests.helpers.run_workers`); wandb's runs and the
progress bar on a terminal go through the real launcher."""

from __future__ import annotations

import json
import os
import pty
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.helpers import PYTHON, REPO, WorkersRun, run_cli, run_workers
from tests.wandb_files import offline_runs, read_offline_run
from train.observe.wandb_sink import sync_commands

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "default.yaml")
SMALL = ["data.synthetic.train_samples=1536", "data.synthetic.test_samples=301",
         "train.batch_size=128", "train.epochs=2", "log.every_steps=4"]


def no_credentials(home: Path) -> dict[str, str]:
    """An environment in which wandb finds no API key (so `auto` means offline)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "HOME": str(home), "NETRC": str(home / ".netrc")}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("wandb_run")
    home = tmp_path_factory.mktemp("home")
    result = run_cli("launch", "--cpu", CONFIG, *SMALL, f"run.dir={run_dir}", "wandb.group=g1",
                     "wandb.tags=[t1, t2]", "checkpoint.every_steps=5", env=no_credentials(home))
    assert result.returncode == 0, result.stderr
    return run_dir, result


def test_one_offline_wandb_run_per_job_holds_config_metrics_and_system(wandb_run):
    run_dir, result = wandb_run
    files = offline_runs(run_dir)
    assert len(files) == 1  # one run for the job, not one per rank
    assert "wandb: offline run" in result.stdout and "wandb sync" in result.stdout
    run = read_offline_run(files[0])
    assert (run.project, run.name, run.group) == ("dptrain", run_dir.name, "g1")
    assert run.config["model"]["name"] == "lenet"
    assert run.config["train"]["batch_size"] == 128
    system = run.config["system"]
    assert (system["world_size"], system["mode"], system["backend"]) == (2, "ddp", "gloo")
    assert system["torch"].startswith("2.14.1")
    steps = [h for h in run.history if "train/loss" in h]
    assert [h["trainer/step"] for h in steps] == [4, 8, 12, 16, 20, 24]
    assert {"train/lr", "train/samples_per_s", "train/time_compute_ms"} <= steps[0].keys()
    epochs = [h for h in run.history if "epoch/test_accuracy" in h]
    ours = records(run_dir)
    assert [h["epoch/test_accuracy"] for h in epochs] == [r["test_accuracy"] for r in ours]
    # n/a (null) in a record: nothing logged to wandb for that epoch
    assert [h.get("epoch/time_sync_ms") for h in epochs] == [r["time_sync_ms"] for r in ours]


def test_a_resumed_job_continues_the_same_wandb_run(tmp_path, wandb_run):
    source, _ = wandb_run
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(source), str(run_dir)], check=True)
    newest = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
    newest.unlink()  # as if the job had died before its last checkpoint
    again = run_cli("launch", "--cpu", CONFIG, *SMALL, f"run.dir={run_dir}", "wandb.group=g1",
                    "wandb.tags=[t1, t2]", "checkpoint.every_steps=5",
                    env=no_credentials(tmp_path))
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout
    ids = {read_offline_run(f).run_id for f in offline_runs(run_dir)}
    assert len(offline_runs(run_dir)) == 2 and len(ids) == 1
    first, second = (f.parent for f in offline_runs(run_dir))
    # Both segments are uploaded, in order, the second appended to the first, with the venv's
    # wandb (not on PATH without an activated venv).
    wandb = str(Path(PYTHON).parent.relative_to(REPO) / "wandb")
    assert f"{wandb} sync {first} && {wandb} sync --append {second}" in again.stdout


def test_plain_progress_lines_without_a_terminal_and_silent_other_ranks(wandb_run):
    _, result = wandb_run
    lines = result.stdout.splitlines()
    assert any(line.startswith("epoch 1/2 step 4/12  step loss ")
               and "samples/s  eta epoch 0:" in line and ", run 0:" in line for line in lines)
    # the epoch's mean loss, once (not per rank), with evaluation and the probe apart
    [last] = [line for line in lines if line.startswith("epoch 2/2  mean loss")]
    assert ", eval " in last and "probe" not in last and "sync n/a" in last
    [first] = [line for line in lines if line.startswith("epoch 1/2  mean loss")]
    assert ", sync probe " in first and "sync n/a" not in first
    assert "[rank 1]" not in result.stdout + result.stderr
    assert "\r" not in result.stdout  # no progress bar redraws in a log file


def test_a_progress_bar_on_a_terminal_and_a_fault_unnoticed_without_the_ledger(tmp_path):
    """Under a pseudo-terminal the main worker draws a tqdm bar instead of lines. The same run
    plants the fault the ledger catches below, without the ledger: it trains on quietly (so
    the ledger's test can fail)."""
    out = bytearray()

    def read(fd: int) -> bytes:
        data = os.read(fd, 4096)
        out.extend(data)
        return data

    cmd = [PYTHON, "-m", "launch", "--cpu", CONFIG, *SMALL, f"run.dir={tmp_path}",
           "wandb.mode=disabled", "debug.skip_set_epoch=true"]
    told = {"PYTHONPATH": str(REPO), "COLUMNS": "140"}  # a fresh pty's size is 0x0
    old = {name: os.environ.get(name) for name in told}
    os.environ.update(told)
    try:
        status = pty.spawn(cmd, read)
    finally:
        for name, value in old.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "epoch 1/2:" in text and "step/s" in text and "\r" in text  # tqdm redraws
    assert "loss=" in text and "samples/s=" in text and "run_eta=" in text
    assert "epoch 1/2 step 4/12" not in text  # not the plain lines


def test_step_time_breakdown_is_recorded_with_its_method(wandb_run):
    run_dir, _ = wandb_run
    probed, skipped = records(run_dir)  # 12-step epochs: the probe runs once per run
    for r in (probed, skipped):
        known = [p for p in ("data", "compute", "sync", "optim") if r[f"time_{p}_ms"] is not None]
        phases = [r[f"time_{p}_ms"] for p in known]
        assert all(v >= 0 for v in phases)
        assert all(r[f"time_{p}_ms_max"] >= r[f"time_{p}_ms"] - 1e-9 for p in known)
        step_ms = 1000 * r["epoch_time_s"] / 12
        # The phases make up the step. Lower bound 0.5: on a loaded 2-core machine time spent
        # descheduled between two phases is nobody's (33.2 of 47.7 ms was seen in CI's suite).
        assert 0.5 * step_ms < sum(phases) <= 1.05 * step_ms
        # In-memory data: waiting is negligible next to forward/backward. Where the probe ran,
        # its sync estimate was taken out of that time, up to all of it (a loaded machine's
        # noise can make the estimate the larger: compute 0.0 was seen in the suite).
        assert r["time_compute_ms"] + (r["time_sync_ms"] or 0) > r["time_data_ms"]
        assert r["eval_time_s"] > 0
        assert r["peak_memory_mb"] > 10
    # Two workers sync, and the probe ran: an estimate, not n/a. It may be 0.0: one synced pass
    # minus one under no_sync(), clamped at 0, where a loaded machine's noise hides a small
    # model's allreduce (seen in CI). Its size is no test's business; the scratch path's is.
    assert probed["time_sync_ms"] is not None and probed["time_sync_ms"] >= 0
    assert probed["probe_time_s"] > 0
    assert probed["sync_method"].startswith("estimated: ")
    assert skipped["time_sync_ms"] is None and skipped["probe_time_s"] is None  # n/a, not 0.0
    assert skipped["time_sync_ms_max"] is None
    assert skipped["sync_method"].startswith("not estimated in this epoch (once per run: ")


@pytest.fixture(scope="module")
def ledger_run(tmp_path_factory) -> tuple[Path, WorkersRun]:
    """One run for two independent settings: the ledger on, the sync probe off."""
    run_dir = tmp_path_factory.mktemp("ledger_run")
    result = run_workers(2, CONFIG, *SMALL, f"run.dir={run_dir}", "wandb.mode=disabled",
                         "check.sample_ledger=true", "log.sync_probe=false")
    assert result.returncode == 0, result.stderr
    return run_dir, result


def test_the_sync_probe_can_be_turned_off(ledger_run):
    run_dir, result = ledger_run
    for r in records(run_dir):
        assert (r["time_sync_ms"], r["probe_time_s"]) == (None, None)
        assert r["sync_method"].startswith("not estimated in this epoch (log.sync_probe=false)")
    assert "probe" not in "".join(x for x in result.stdout.splitlines() if "mean loss" in x)


def test_scratch_path_measures_its_sync_directly(tmp_path):
    result = run_workers(2, CONFIG, *SMALL, "mode=scratch", f"run.dir={tmp_path}",
                         "wandb.mode=disabled")
    assert result.returncode == 0, result.stderr
    for r in records(tmp_path):
        assert r["mode"] == "scratch" and r["sync_method"].startswith("measured: ")
        assert r["time_sync_ms"] > 0


@pytest.mark.parametrize("mode", ["ddp", "scratch"])
def test_one_worker_has_no_sync_time_and_no_probe(tmp_path, mode):
    """Nothing to synchronize with one worker: n/a, not a collective's cost with itself."""
    result = run_workers(1, CONFIG, *SMALL, f"mode={mode}", f"run.dir={tmp_path}",
                         "wandb.mode=disabled")
    assert result.returncode == 0, result.stderr
    for r in records(tmp_path):
        assert (r["world_size"], r["time_sync_ms"], r["probe_time_s"]) == (1, None, None)
        assert r["time_sync_ms_ranks"] is None
        assert r["sync_method"] == "n/a: one worker, nothing to synchronize"
    assert "probe" not in "".join(x for x in result.stdout.splitlines() if "mean loss" in x)


def test_sample_ledger_records_disjoint_covering_shards(ledger_run):
    run_dir, _ = ledger_run
    entries = [json.loads(line) for line in
               (run_dir / "sample_ledger.jsonl").read_text().splitlines()]
    train = [e for e in entries if e["split"] == "train"]
    test = [e for e in entries if e["split"] == "test"]
    assert [e["epoch"] for e in train] == [1, 2] and len(test) == 2
    for e in train:
        first, second = e["ranks"]
        assert len(first) == len(second) == 12 * 64 and not set(first) & set(second)
    assert train[0]["ranks"] != train[1]["ranks"]
    assert sorted(i for r in test[0]["ranks"] for i in r) == list(range(301))
    assert all(e["problems"] == [] for e in entries)


@pytest.mark.parametrize("fault, message", [
    ("debug.skip_set_epoch=true", "the same order as the previous epoch on every rank"),
    ("debug.pad_eval=true", "test samples counted twice: 1"),
])
def test_sample_ledger_catches_planted_faults(tmp_path, fault, message):
    result = run_workers(2, CONFIG, *SMALL, f"run.dir={tmp_path}", "wandb.mode=disabled",
                         "check.sample_ledger=true", fault)
    assert result.returncode == 3
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sample ledger" in errors[0] and message in errors[0]


# (from test_console.py, now in tests/unit: this one starts the printed command.)
def test_the_printed_wandb_command_runs_as_printed(tmp_path):
    segment = tmp_path / "wandb" / "offline-run-20260101_000000-abc123"
    segment.mkdir(parents=True)
    command = sync_commands(segment)
    tool, verb, *rest = shlex.split(command)
    assert (verb, rest) == ("sync", [str(segment)])
    # `wandb` itself is not on PATH here (no venv activated): the venv's own is printed.
    done = subprocess.run([tool, "sync", "--help"], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
