"""Input the commands refuse before they start anything: one line, exit 2, nothing written.

Each case calls the command's own `main(argv)` in this process (tests/inprocess.py); the
test files beside the real runs keep one real command line per behaviour (test_cli.py,
test_doctor.py, test_plot.py), and the workers' own checks under torchrun stay real runs."""

from __future__ import annotations

import socket
import time

import pytest

from launch.doctor import main as doctor_main
from tests.helpers import REPO, small_run
from tests.inprocess import launcher_main, run_main
from tools.plot import main as plot_main
from train.observe.wandb_sink import unreachable

CONFIG = str(REPO / "configs" / "default.yaml")


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("args, message", [
    # the launcher's own arguments and the config (test_cli.py)
    (["configs/missing.yaml"], "config file not found: configs/missing.yaml"),
    ([CONFIG, "train.epoch=3"], "unknown key 'train.epoch' (did you mean train.epochs?)"),
    ([CONFIG, "optim.lr=fast"], "optim.lr expects a number"),
    (["--gpus", "3", CONFIG], "train.batch_size=256 (the global batch) is not divisible by 3"),
    (["--gpus", "0", CONFIG], "--gpus must be at least 1"),
    ([CONFIG, "dist.device=cuda"], "no GPU is visible"),
    ([CONFIG, "data.name=fashion_mnist", "data.root=nowhere", "data.download=false"],
     "dataset fashion_mnist cannot be read from nowhere/FashionMNIST/raw"),
    (["--nnodes", "2", CONFIG], "several nodes need --master-addr"),
    (["--mode", "dp", "--max-restarts", "2", CONFIG], "--max-restarts 2 needs torchrun workers"),
    # the paths (test_paths.py)
    (["--mode", "dp", "--nnodes", "2", "--master-addr", "127.0.0.1", CONFIG],
     "mode dp runs one process on one node"),
    (["--mode", "scratch", CONFIG, "scratch.algorithm=tree"],
     "scratch.algorithm must be one of naive, ring; got 'tree'"),
    (["--mode", "scratch", CONFIG, "scratch.bucket_mb=0"], "scratch.bucket_mb must be positive"),
    (["--mode", "scratch", CONFIG, "scratch.bucket_mb=-2"], "scratch.bucket_mb must be positive"),
    # an elastic range (test_elastic.py)
    (["--cpu", "--nnodes", "3:2", "--master-addr", "127.0.0.1", CONFIG],
     "error: --nnodes 3:2: MIN must not exceed MAX"),
    (["--cpu", "--nnodes", "0:2", "--master-addr", "127.0.0.1", CONFIG],
     "error: --nnodes must be at least 1; got 0:2"),
    (["--cpu", "--nnodes", "two", "--master-addr", "127.0.0.1", CONFIG],
     "error: --nnodes expects N or MIN:MAX (whole numbers); got 'two'"),
    # knobs (test_knobs.py)
    (["--mode", "dp", CONFIG, "perf.compile=on"], "perf.compile=on does not work with mode dp"),
    (["--cpu", CONFIG, "perf.precision=fp16"], "perf.precision=fp16 needs a GPU"),
    (["--cpu", CONFIG, "model.sync_bn=true"], "model.sync_bn needs mode ddp on GPUs"),
    (["--cpu", CONFIG, "ddp.static_graph=true", "train.grad_accum_steps=2"],
     "pytorch/pytorch#143580"),
    # a config that would mean something else (test_config_meaning.py)
    (["--cpu", CONFIG, "optim.name=adamw", "optim.nesterov=true"],
     "optim.nesterov=true applies only to optim.name=sgd"),
    (["--cpu", CONFIG, "optim.schedule=step"], "30, 60, 80 lie at or beyond the run's end"),
    (["--cpu", CONFIG, "data.synthetic.train_samples=512", "optim.warmup_epochs=0",
      "optim.warmup_steps=20"], "optim.warmup_steps=20 does not end before the run does: the "
                                "run has 12 optimizer steps (6 epoch(s) of 2 steps)"),
])
def test_the_launcher_refuses_bad_input_in_one_line(tmp_path, monkeypatch, args, message):
    result = run_main(launcher_main(monkeypatch), *args, f"run.dir={tmp_path / 'run'}")
    line = one_error_line(result)
    assert message in line and result.stdout == ""
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_the_launcher_refuses_a_key_given_twice_in_a_yaml_section(tmp_path, monkeypatch):
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  epochs: 3\n  batch_size: 64\n  epochs: 5\n")
    result = run_main(launcher_main(monkeypatch), "--cpu", str(twice),
                      f"run.dir={tmp_path / 'run'}")
    assert one_error_line(result) == (f"error: {twice}: key 'epochs' is given twice in one "
                                      f"section (lines 2 and 4); keep one")
    assert not (tmp_path / "run").exists()


def test_the_launcher_refuses_an_online_wandb_run_whose_server_is_down_in_seconds(
        tmp_path, monkeypatch):
    with socket.socket() as s:  # bound and closed again: connections are refused
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", url)
    unreachable.cache_clear()
    started = time.monotonic()
    result = run_main(launcher_main(monkeypatch), "--cpu", CONFIG, "wandb.mode=online",
                      f"run.dir={tmp_path / 'run'}")
    unreachable.cache_clear()
    assert time.monotonic() - started < 15
    assert f"wandb server {url} cannot be reached" in one_error_line(result)
    assert "run with wandb.mode=offline" in result.stderr
    assert not (tmp_path / "run").exists()


# 1536 samples / 256 = 6 steps per epoch (test_profile.py).
@pytest.mark.parametrize("steps, message", [
    ("5-3", "perf.profile_steps must be A-B, optimizer steps counted from 1 with A <= B"),
    ("0-2", "perf.profile_steps must be A-B"),
    ("7-9", "perf.profile_steps=7-9 is outside the run: it has 6 optimizer steps (1-6)"),
])
def test_the_launcher_refuses_profile_steps_outside_the_run(tmp_path, monkeypatch, steps,
                                                             message):
    run = small_run(tmp_path / "run", "train.max_steps=6", f"perf.profile_steps={steps}")
    result = run_main(launcher_main(monkeypatch), "--cpu", CONFIG, *run)
    assert message in one_error_line(result)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["configs/no-such.yaml"], "config file not found"),
    ([CONFIG, "train.no_such_key=1"], "unknown key 'train.no_such_key'"),
    (["--nnodes", "2", "--node-rank", "2", CONFIG], "--node-rank must be in 0..1"),
])
def test_the_doctor_refuses_bad_input_in_one_line(args, message):
    result = run_main(doctor_main, *args)
    assert message in one_error_line(result) and result.stdout == ""


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), "has no metrics.jsonl"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("")), "is empty"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("{oops\n")), "not valid JSON"),
], ids=["missing", "no-metrics", "empty", "bad-json"])
def test_plot_refuses_a_bad_run_in_one_line(tmp_path, setup, message):
    run_dir = tmp_path / "run"
    setup(run_dir)
    result = run_main(plot_main, str(run_dir))
    line = one_error_line(result)
    assert message in line and str(run_dir) in line
    assert not (run_dir / "plots").exists()
