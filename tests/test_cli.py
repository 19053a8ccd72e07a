"""The real command line, end to end, as a user types it."""

import importlib.util
import json
import os
import re
import signal
import socket
import time

import pytest
import torch
import yaml

from launch.checks import check_run_folder
from launch.cli import parse_args
from launch.job import plan_job
from tests.helpers import REPO, free_port, gpu_count, gpu_env, run_cli, run_workers, small_run
from train.config import load_config
from train.run.identity import identity

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "default.yaml")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def printed_folder(stdout: str) -> str:
    """The run folder the workers name first (`run folder: ...`)."""
    return next(line.split(": ", 1)[1] for line in stdout.splitlines()
                if line.startswith("run folder: "))


@pytest.mark.compat
def test_launch_trains_with_two_cpu_workers_and_leaves_a_run_folder(tmp_path):
    result = run_cli("launch", "--cpu", "--gpus", "2", CONFIG, "train.epochs=2",
                     "data.synthetic.train_samples=1536", "data.synthetic.test_samples=501",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 CPU worker(s) with gloo" in result.stdout
    assert "epoch 2/2" in result.stdout
    # run.dir defaults to runs/<config name>-<8 hex digits>, printed before training starts
    folder = printed_folder(result.stdout)
    assert re.fullmatch(r"runs/default-[0-9a-f]{8}", folder), folder
    assert result.stdout.index("run folder: ") < result.stdout.index("epoch 1/2")
    run = tmp_path / folder
    # wandb.mode=auto: offline into run.dir/wandb, or nothing where wandb is not installed
    # (the torch-2.11 tier, like the GPU machine, has none)
    wandb = ["wandb"] if importlib.util.find_spec("wandb") else []
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints", "classes.json", "config.yaml", "metrics.jsonl", "summary.json", *wandb]
    assert (tmp_path / "runs" / "latest").resolve() == run.resolve()
    saved = load_config(run / "config.yaml")
    assert identity(saved) == identity(load_config(CONFIG, [
        "train.epochs=2", "data.synthetic.train_samples=1536", "data.synthetic.test_samples=501"]))
    assert (saved.run.dir, saved.run.name) == (folder, "default")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert {"epoch", "train_loss", "train_accuracy", "test_accuracy", "epoch_time_s",
                "samples_per_s", "world_size", "mode"} <= r.keys()
        assert r["world_size"] == 2 and r["mode"] == "ddp" and r["test_samples"] == 501
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_test_accuracy"] == records[-1]["test_accuracy"]
    assert summary["steps"] == 2 * (1536 // 256)
    best = max(records, key=lambda r: r["test_accuracy"])
    assert (summary["best_epoch"], summary["best_test_accuracy"]) == (best["epoch"],
                                                                      best["test_accuracy"])
    assert (summary["model"], summary["dataset"], summary["stopped_by_max_steps"]) == (
        "lenet", "synthetic", False)
    assert summary["final_checkpoint"] == f"{folder}/checkpoints/step_{12:08d}.pt"
    assert (tmp_path / summary["final_checkpoint"]).is_file()
    assert summary["eval_time_s"] == pytest.approx(sum(r["eval_time_s"] for r in records))
    assert all(r["eval_time_s"] > 0 for r in records)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state["model"])
    assert {"features.0.weight", "classifier.3.bias"} <= state["model"].keys()


def test_the_default_config_learns_far_above_chance(tmp_path):
    """Every default (data, model, batch, optimizer, warmup, workers) but the epoch count: the
    config says it is far above chance after its first epoch (0.87 there; 0.89 after all 6),
    and one epoch is a sixth of the time."""
    result = run_cli("launch", "--cpu", CONFIG, f"run.dir={tmp_path}", "train.epochs=1")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2  # two CPU workers by default without a GPU
    assert summary["steps"] == 24000 // 256  # the default's whole first epoch
    assert summary["final_test_accuracy"] > 0.75  # chance is 0.10


@pytest.mark.compat
def test_torchrun_directly_runs_the_same_workers(tmp_path):
    result = run_cli("torch.distributed.run", "--nproc-per-node=2",
                     f"--master-port={free_port()}", "-m", "train", CONFIG,
                     *small_run(tmp_path, "train.max_steps=3"), cwd=REPO)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["world_size"], summary["steps"], summary["backend"]) == (2, 3, "gloo")


@pytest.mark.compat
def test_one_process_without_torchrun(tmp_path):
    result = run_cli("train", CONFIG, *small_run(tmp_path, "train.max_steps=2"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["world_size"], summary["mode"]) == (1, "single")
    assert summary["stopped_by_max_steps"] is True
    header = result.stderr + result.stdout
    # 2 usable cores here: one process takes both, and its first line says so plainly
    assert "single: one process on cpu, 2 threads;" in header, header
    assert "thread(s)" not in header and "threads each" not in header
    assert "6 steps/epoch, 2 steps: train.max_steps ends the run in epoch 1 of 2" in header
    assert "epoch 1/1 " in header and "epoch 1/2" not in header  # the run's real end


# One real command line for the behaviour; every message is checked in process, through the
# same main(), in tests/unit/test_bad_input.py.
@pytest.mark.parametrize("args, message", [
    ([CONFIG, "train.epoch=3"], "unknown key 'train.epoch' (did you mean train.epochs?)"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    result = run_cli("launch", *args, f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_gpus_this_torch_cannot_use_stop_the_launcher_in_one_line(tmp_path):
    """The machine's GPUs as nvidia-smi shows them: a stand-in script on PATH (driver
    550.54.15, CUDA 12.4); the torch is this venv's own, which sees no GPU here, the honest
    stand-in for a CPU-only build or one built for a newer CUDA than the driver's. Each line's
    wording, --cpu and the doctor's row are checked in process (tests/unit/test_gpu_stack.py);
    here the real command and the real nvidia-smi call."""
    if gpu_count() > 0:
        pytest.skip("this torch sees a GPU: it cannot stand in for one that cannot")
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho '| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    "
                   "CUDA Version: 12.4     |'\n")
    smi.chmod(0o755)
    env = {"PATH": f"{smi.parent}:{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": None}
    result = run_cli("launch", CONFIG, f"run.dir={tmp_path / 'run'}", env=env)
    assert result.returncode == 2, result.stdout
    lines = error_lines(result.stderr)
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: this machine has GPUs (driver 550.54.15, CUDA 12.4; "
                               f"seen by nvidia-smi) but torch {torch.__version__} cannot use")
    assert build in lines[0] and "--index-url https://download.pytorch.org/whl/cu124" in lines[0]
    assert not (tmp_path / "run").exists()  # --cpu trains instead: tests/unit/test_gpu_stack.py


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 1, reason="needs a GPU (CPU twin: dist.device=cuda above)")
def test_more_gpus_than_visible_is_refused(tmp_path):
    result = run_cli("launch", "--gpus", str(gpu_count() + 1), CONFIG, f"run.dir={tmp_path}",
                     env=gpu_env())
    assert result.returncode == 2
    assert "GPUs asked (--gpus/GPUS) but only" in result.stderr


def test_a_folder_holding_a_different_run_is_left_alone(tmp_path):
    # The run already there: the workers' own (tests.helpers.run_workers); the launcher's
    # refusal and overwrite are what this tests.
    first = run_workers(2, CONFIG, *small_run(tmp_path, "train.max_steps=2"))
    assert first.returncode == 0, first.stderr
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    second = run_cli("launch", "--cpu", CONFIG, *small_run(tmp_path, "train.max_steps=3"))
    assert second.returncode == 2
    lines = error_lines(second.stderr)
    assert len(lines) == 1 and "already holds a different run (train.max_steps: 2 -> 3)" in lines[0]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before

    third = run_cli("launch", "--cpu", CONFIG, *small_run(tmp_path, "train.max_steps=3",
                                                          "run.overwrite=true"))
    assert third.returncode == 0, third.stderr
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["max_steps"] == 3


def test_an_overwrite_that_fails_on_bad_input_leaves_the_old_run(tmp_path):
    """The old run goes only once the new one has passed every check, also those that only the
    workers can make (here: through torchrun directly, a training set below one batch)."""
    first = run_workers(2, CONFIG, *small_run(tmp_path, "train.max_steps=2"))  # the old run
    assert first.returncode == 0, first.stderr
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    failed = run_cli("torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
                     "-m", "train", CONFIG, *small_run(tmp_path, "run.overwrite=true",
                                                       "data.synthetic.train_samples=100"))
    assert failed.returncode != 0
    assert "smaller than one global batch" in failed.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


# One case per phase a worker finds bad input in: the config's checks before the data
# (common/validate.py: `validate`), and the data's (building it, `validate_with_data`). Each
# message is checked in process (tests/unit/test_validate.py, tests/unit/test_bad_input.py).
@pytest.mark.parametrize("workers, overrides, message", [
    (2, ["data.name=mnist", "data.root={tmp}/none", "data.download=false"],
     "dataset mnist cannot be read"),
    (3, [], "train.batch_size=256 (the global batch) is not divisible by 3 workers"),
])
def test_workers_that_find_bad_input_report_it_once(tmp_path, workers, overrides, message):
    """Through torchrun directly (no launcher checks): one line, from one process."""
    result = run_cli("torch.distributed.run", f"--nproc-per-node={workers}",
                     f"--master-port={free_port()}", "-m", "train", CONFIG,
                     f"run.dir={tmp_path}", "wandb.mode=disabled",
                     *(o.format(tmp=tmp_path) for o in overrides))
    # Our one line first; then torchrun's own report (each worker's exit code 2), and torchrun
    # itself exits 1: its code, not ours (docs/troubleshooting.md#bad-input).
    assert result.returncode == 1
    reported = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(reported) == 1 and message in reported[0], result.stderr
    report = result.stderr.index("ChildFailedError")
    assert result.stderr.index(reported[0]) < report
    assert "exitcode  : 2" in result.stderr[report:]


@pytest.mark.serial  # bounds its time: away from the CPU-bound tests (tests/suite.py)
def test_an_online_wandb_run_whose_server_does_not_answer_ends_in_seconds(tmp_path):
    """wandb's own init would wait about 90 s; the launcher asks the server first."""
    with socket.socket() as s:  # bound and closed again: connections are refused
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    started = time.monotonic()
    result = run_cli("launch", "--cpu", CONFIG, f"run.dir={tmp_path / 'run'}",
                     "wandb.mode=online", env={"WANDB_API_KEY": "0" * 40,
                                               "WANDB_BASE_URL": url})
    assert time.monotonic() - started < 15
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line and "Connection refused" in line, result.stderr
    assert line.startswith(f"error: wandb.mode=online but the wandb server {url} cannot be "
                           f"reached (")
    assert line.endswith("run with wandb.mode=offline (logs into run.dir/wandb for a later "
                         "`wandb sync`) or wandb.mode=disabled")
    assert not (tmp_path / "run").exists()


def test_launcher_exit_code_is_non_zero_when_a_worker_fails(monkeypatch):
    from launch.agent import run_torchrun

    # run_torchrun names this process as the workers' parent in os.environ: undone afterwards,
    # else workers that later tests start through torchrun directly exit at once (143).
    monkeypatch.setenv("DPTRAIN_PARENT_PID", "0")
    # torchrun's agent leaves its own handlers of the stop signals installed: put them back.
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    saved = {sig: signal.getsignal(sig) for sig in stops}
    try:
        code = run_torchrun(["--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                             "--rdzv-endpoint", "127.0.0.1:0", "--monitor-interval", "0.2",
                             str(REPO / "tests" / "crash_worker.py"), "3"])
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert code == 3


def test_dp_on_the_cpu_runs_one_process_and_says_gpus_is_ignored(tmp_path):
    result = run_cli("launch", "--cpu", "--mode", "dp", "--gpus", "3", CONFIG,
                     *small_run(tmp_path, "train.max_steps=2"))
    assert result.returncode == 0, result.stderr
    note = result.stdout.splitlines()[0]
    assert note.startswith("launch: mode dp: one process on the CPU"), note
    assert "--gpus 3 ignored" in note
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["world_size"], summary["mode"]) == (1, "dp")
    # DataParallel's sync is inside forward/backward: not measured, so not 0.0
    assert "sync n/a" in next(line for line in result.stdout.splitlines()
                              if line.startswith("epoch 1/1  "))
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert (record["time_sync_ms"], record["probe_time_s"]) == (None, None)


def test_dp_on_gpus_makes_the_asked_gpus_visible_to_its_one_process(monkeypatch):
    """--gpus N with mode dp: N devices for DataParallel in one process (CPU-checkable)."""
    from launch.plan import Plan, worker_environment

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7")
    cfg = load_config(CONFIG, ["mode=dp"])
    plan = Plan(cfg, 1, 1, 0, "cuda", "none", 4, [], [], "", gpus=2)
    assert worker_environment(plan)["CUDA_VISIBLE_DEVICES"] == "3,5"


TINY = ["data.synthetic.train_samples=768", "data.synthetic.test_samples=200", "train.epochs=1",
        "train.batch_size=128"]


@pytest.mark.timeout(600)  # five runs one after the other: slow when the machine is busy
def test_readme_commands_in_order_never_collide(tmp_path, monkeypatch):
    """The same command resumes (here: finds its run complete, and opens nothing), on any
    number of workers; another config, the one-process path and torchrun directly never meet a
    refusal; the launcher, the doctor and workers started by torchrun name the same folder;
    runs/latest is the newest."""
    def latest() -> str:
        return str((tmp_path / "runs" / "latest").resolve().relative_to(tmp_path.resolve()))

    first = run_cli("launch", "--cpu", CONFIG, *TINY, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    a = printed_folder(first.stdout)
    segments = sorted((tmp_path / a / "wandb").glob("offline-run-*"))
    assert len(segments) == 1 and latest() == a
    metrics = (tmp_path / a / "metrics.jsonl").read_text()

    again = run_cli("launch", "--cpu", CONFIG, *TINY, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert printed_folder(again.stdout) == a and f"{a} is complete" in again.stdout
    assert "wandb" not in again.stdout  # no run opened, no sync command for an empty one
    assert sorted((tmp_path / a / "wandb").glob("offline-run-*")) == segments
    assert (tmp_path / a / "metrics.jsonl").read_text() == metrics

    monkeypatch.chdir(tmp_path)  # the doctor's own row, in this process (the same function)
    verdict, row = check_run_folder(plan_job(parse_args(["--cpu", CONFIG, *TINY]), dry=True))
    assert verdict == "OK" and row.startswith(f"{a}: complete (step_{6:08d}.pt"), row

    longer = run_cli("launch", "--cpu", CONFIG, *TINY, "train.epochs=2", "wandb.mode=disabled",
                     cwd=tmp_path)
    assert longer.returncode == 0, longer.stderr
    b = printed_folder(longer.stdout)
    assert b != a and "epoch 2/2" in longer.stdout and latest() == b

    alone = run_cli("train", CONFIG, *TINY, "wandb.mode=disabled", cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr  # 1 worker, not the 2 of folder a: the same run
    assert printed_folder(alone.stdout + alone.stderr) == a and latest() == a
    assert f"{a} is complete" in alone.stdout + alone.stderr

    direct = run_cli("torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
                     "-m", "train", CONFIG, *TINY, "wandb.mode=disabled", cwd=tmp_path)
    assert direct.returncode == 0, direct.stderr
    assert f"{a} is complete" in direct.stdout + direct.stderr  # the launcher's folder
