"""`python -m launch.doctor`: every check runs, each problem is one FAIL row, exit 1 if any."""

from __future__ import annotations

import re
import socket

import pytest

from common.config import to_yaml
from launch.checks import FAIL, OK, WARN, check_gpus, check_run_folder, check_wandb, run_check
from launch.cli import parse_args
from launch.doctor import ROWS as CHECKS
from launch.job import plan_job
from tests.helpers import REPO, free_port, run_cli
from train.config import load_config

CONFIG = str(REPO / "configs" / "default.yaml")


def doctor(*args: str):
    return run_cli("launch.doctor", *args, timeout=120)


def rows(stdout: str) -> dict[str, tuple[str, str]]:
    """check name -> (verdict, detail), from the printed table."""
    table = {}
    for line in stdout.splitlines():
        parts = [p.strip() for p in line.split(" | ", 2)]
        if len(parts) == 3 and parts[0] != "check":
            table[parts[0]] = (parts[1], parts[2])
    return table


@pytest.mark.slow
def test_default_config_is_ready_to_launch(tmp_path):
    result = doctor("--cpu", CONFIG, f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("doctor: mode ddp, 2 worker(s) x 1 node(s) = 2 in all, cpu (gloo)")
    assert lines[-1] == "doctor: ready to launch"
    table = rows(result.stdout)
    assert list(table) == [name for name, _ in CHECKS]
    assert FAIL not in {verdict for verdict, _ in table.values()}
    assert "2 CPU worker(s) with gloo" in table["GPUs"][1]
    assert table["rendezvous port"] == (OK, "single node: a free port is picked at launch")
    verdict, detail = table["allreduce"]
    assert verdict == OK and re.search(r"algbw \d+\.\d+ GB/s, busbw \d+\.\d+ GB/s", detail)
    assert "offline" in table["wandb"][1]  # run_cli hides credentials
    assert not (tmp_path / "run").exists()  # the doctor changes nothing on disk


@pytest.mark.slow
def test_busy_explicit_port_fails(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = doctor("--cpu", "--master-port", str(port), CONFIG, f"run.dir={tmp_path}")
    assert result.returncode == 1
    verdict, detail = rows(result.stdout)["rendezvous port"]
    assert verdict == FAIL and f"port {port} is already in use" in detail
    assert result.stdout.splitlines()[-1] == "doctor: 1 problem(s) would stop the job"


@pytest.mark.slow
def test_every_problem_is_reported_not_only_the_first(tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    result = doctor("--cpu", CONFIG, "train.batch_size=255", "data.name=mnist",
                    f"data.root={empty}", "data.download=false", f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 1
    table = rows(result.stdout)
    assert table["batch"][0] == FAIL and "not divisible by 2 workers" in table["batch"][1]
    assert table["dataset"][0] == FAIL
    assert str(empty / "MNIST" / "raw") in table["dataset"][1]
    assert "train-images-idx3-ubyte" in table["dataset"][1]
    assert table["allreduce"][0] == OK  # the checks after the first FAIL still ran
    assert result.stdout.splitlines()[-1] == "doctor: 2 problem(s) would stop the job"


@pytest.mark.slow
def test_other_node_warns_when_nothing_listens_at_the_master():
    port = free_port()  # nobody listens there
    result = doctor("--cpu", "--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1",
                    "--master-port", str(port), CONFIG)
    assert result.returncode == 0, result.stdout
    table = rows(result.stdout)
    verdict, detail = table["master reachable"]
    assert verdict == WARN and "nothing listens there yet" in detail and "start node 0" in detail
    assert f"127.0.0.1:{port}" in detail
    assert table["rendezvous port"][0] == "SKIP"
    assert "4 in all" in result.stdout.splitlines()[0]


@pytest.mark.slow
def test_unresolvable_master_fails():
    result = doctor("--cpu", "--nnodes", "2", "--node-rank", "1", "--master-addr",
                    "no-such-host.invalid", CONFIG)
    assert result.returncode == 1
    verdict, detail = rows(result.stdout)["master reachable"]
    assert verdict == FAIL and "no-such-host.invalid" in detail and "does not resolve" in detail


@pytest.mark.parametrize("args, message", [
    (["configs/no-such.yaml"], "config file not found"),
    ([CONFIG, "train.no_such_key=1"], "unknown key 'train.no_such_key'"),
    (["--nnodes", "2", "--node-rank", "2", CONFIG], "--node-rank must be in 0..1"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = doctor(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr and result.stdout == ""


# --- single checks, in this process, on real folders -----------------------------------------


def job_for(*argv: str):
    return plan_job(parse_args(["--cpu", *argv]))


def test_run_folder_holding_another_run_fails(tmp_path):
    # The check lets check_run_dir's UserError through; run_check turns it into the FAIL row.
    (tmp_path / "config.yaml").write_text(to_yaml(load_config(CONFIG, ["train.epochs=1"])))
    verdict, detail = run_check(check_run_folder, job_for(CONFIG, f"run.dir={tmp_path}"))
    assert verdict == FAIL and "already holds a different run" in detail
    assert "train.epochs: 1 -> 6" in detail
    verdict, detail = check_run_folder(job_for(CONFIG, f"run.dir={tmp_path}",
                                               "run.overwrite=true"))
    assert verdict == WARN and "will be deleted" in detail


def checkpoints(folder, *positions: tuple[int, int]) -> None:
    """Checkpoint files at (epochs done, steps done), as far as the check reads them."""
    import torch

    (folder / "checkpoints").mkdir()
    for epoch, step in positions:
        torch.save({"epoch": epoch, "step": step, "model": {"w": torch.zeros(3)}},
                   folder / "checkpoints" / f"step_{step:08d}.pt")


def test_run_folder_with_checkpoints_resumes(tmp_path):
    (tmp_path / "config.yaml").write_text(to_yaml(load_config(CONFIG, [f"run.dir={tmp_path}"])))
    checkpoints(tmp_path, (0, 3), (1, 6))
    assert check_run_folder(job_for(CONFIG, f"run.dir={tmp_path}")) == (
        OK, f"{tmp_path}: will resume from step_00000006.pt (epoch 2, step 6)")
    verdict, detail = check_run_folder(job_for(CONFIG, f"run.dir={tmp_path}",
                                               "checkpoint.resume=false"))
    assert verdict == OK and "starts over" in detail


@pytest.mark.parametrize("position, extra", [((6, 558), []),  # every epoch done
                                             ((0, 40), ["train.max_steps=40"])])
def test_a_complete_run_is_called_complete(tmp_path, position, extra):
    (tmp_path / "config.yaml").write_text(to_yaml(load_config(CONFIG, [*extra])))
    checkpoints(tmp_path, position)
    verdict, detail = check_run_folder(job_for(CONFIG, f"run.dir={tmp_path}", *extra))
    assert verdict == OK and f"{tmp_path}: complete (step_{position[1]:08d}.pt" in detail
    assert "nothing left to train" in detail and "will resume" not in detail


def test_checkpoints_that_do_not_read_back_are_a_warning(tmp_path):
    (tmp_path / "config.yaml").write_text(to_yaml(load_config(CONFIG)))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_00000006.pt").write_bytes(b"truncated")
    verdict, detail = check_run_folder(job_for(CONFIG, f"run.dir={tmp_path}"))
    assert verdict == WARN and "none reads back" in detail


def test_forced_online_wandb_without_credentials_fails(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    verdict, detail = check_wandb(job_for(CONFIG, "wandb.mode=online"))
    assert verdict == FAIL and "no credentials" in detail
    verdict, detail = check_wandb(job_for(CONFIG, f"run.dir={tmp_path}"))
    assert verdict == OK and f"{tmp_path}/wandb" in detail and "wandb sync" in detail


def test_cuda_asked_without_gpu_fails():  # the GPUs are hidden from the tests (conftest.py)
    job = plan_job(parse_args([CONFIG, "dist.device=cuda"]))
    assert check_gpus(job) == (FAIL, "dist.device=cuda but no GPU is visible "
                                     "(CUDA_VISIBLE_DEVICES, drivers?)")
