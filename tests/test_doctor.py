"""`python -m launch.doctor`: every check runs, each problem is one FAIL row, exit 1 if any."""

from __future__ import annotations

import os
import re
import socket
import time

import pytest
import torch

from common.config import to_yaml
from common.lock import RunLock
from launch.checks import FAIL, OK, WARN, check_gpus, check_run_folder, check_wandb, run_check
from launch.cli import parse_args
from launch.doctor import ROWS as CHECKS
from launch.job import plan_job
from tests.helpers import REPO, free_port, run_cli
from train.config import load_config
from train.run.checkpoint import Checkpoints
from train.run.identity import identity

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
                    "--master-port", str(port), CONFIG, "dist.rendezvous_timeout_s=3")
    assert result.returncode == 0, result.stdout
    table = rows(result.stdout)
    verdict, detail = table["nodes"]
    assert verdict == WARN and "node 0's doctor did not answer" in detail and "within 3 s" in detail
    assert table["versions"][0] == "SKIP"
    verdict, detail = table["master reachable"]
    assert verdict == WARN and "nothing listens there yet" in detail and "start node 0" in detail
    assert f"127.0.0.1:{port}" in detail
    assert table["rendezvous port"][0] == "SKIP"
    assert "4 in all" in result.stdout.splitlines()[0]


def two_doctors(*node1_env: tuple[str, str], extra: tuple[str, ...] = ()) -> list:
    """Node 0's and node 1's doctors of one job, at once on this machine."""
    import os
    import subprocess

    from tests.helpers import PYTHON, environment

    port = str(free_port())
    procs = []
    for rank, env in ((0, {}), (1, dict(node1_env))):
        procs.append(subprocess.Popen(
            [PYTHON, "-m", "launch.doctor", "--cpu", "--nnodes", "2", "--node-rank", str(rank),
             "--master-addr", "127.0.0.1", "--master-port", port, CONFIG, *extra],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=environment({"PYTHONPATH": str(REPO), "NETRC": os.devnull, **env})))
    return [(p.returncode, rows(out), out + err)
            for p, (out, err) in ((p, p.communicate(timeout=180)) for p in procs)]


@pytest.mark.slow
def test_doctors_of_two_nodes_compare_what_each_brings(tmp_path):
    run = (f"run.dir={tmp_path}",)
    # (Rows that do not compare nodes, the allreduce's timing say, are not this test's.)
    for _, table, text in two_doctors(extra=run):
        assert table["nodes"][0] == OK and "2 of 2 node(s) reported" in table["nodes"][1], text
        assert table["versions"][0] == OK
        assert f"torch {torch.__version__}" in table["versions"][1]
        verdict, detail = table["network interface"]
        assert verdict == OK and "node 0: lo (127.0.0.1); node 1: lo (127.0.0.1)" == detail
        verdict, detail = table["clocks"]
        assert verdict == OK and detail.startswith("against node 0: node 1 ")
    # Node 1 names an interface it does not have: both doctors see it, before any launch.
    for code, table, text in two_doctors(("GLOO_SOCKET_IFNAME", "nosuch0"), extra=run):
        assert code == 1, text
        verdict, detail = table["network interface"]
        assert verdict == FAIL, text
        assert "node 1: GLOO_SOCKET_IFNAME=nosuch0 matches none of its interfaces" in detail


@pytest.mark.slow
@pytest.mark.serial  # bounds its time: away from the CPU-bound tests (tests/suite.py)
def test_a_node_whose_doctor_never_comes_is_named():
    started = time.monotonic()
    result = doctor("--cpu", "--nnodes", "2", "--node-rank", "0", "--master-addr", "127.0.0.1",
                    "--master-port", str(free_port()), CONFIG, "dist.rendezvous_timeout_s=3")
    table = rows(result.stdout)
    verdict, detail = table["nodes"]
    assert verdict == WARN and "1 of 2 node(s) reported" in detail
    assert "node(s) 1 never reported within 3 s" in detail
    assert table["versions"][0] == table["clocks"][0] == "SKIP"
    assert time.monotonic() - started < 60


def facts(**changes) -> dict:
    base = {"host": "a", "python": "3.11.7", "torch": "2.14.1", "cuda": "13.0", "nccl": "2.30.7",
            "interfaces": {"lo": ["127.0.0.1"], "eth0": ["10.0.0.1"]},
            "route": {"interface": "eth0", "address": "10.0.0.1"}, "gloo_address": "10.0.0.1",
            "env": {}, "clock_offset_s": 0.0, "clock_error_s": 0.001}
    return {**base, **changes}


def compared(found_facts: dict, *argv: str):
    """A two-node job whose exchange found `found_facts` (node rank -> facts)."""
    from launch import peers

    job = plan_job(parse_args(["--cpu", "--nnodes", "2", "--master-addr", "10.0.0.1", CONFIG,
                               *argv]))
    peers._DONE[id(job)] = peers.Exchange(found_facts, [0, 1], 1.0)
    return job


def test_different_versions_and_skewed_clocks_fail():
    from launch.node_checks import check_clocks, check_versions

    job = compared({0: facts(), 1: facts(host="b", torch="2.13.0", clock_offset_s=-7.5)})
    verdict, detail = check_versions(job)
    assert verdict == FAIL and "torch differs: node 0 2.14.1, node 1 2.13.0" in detail
    verdict, detail = check_clocks(job)
    assert verdict == FAIL and "node 1 -7.500 s" in detail and "taken for dead" in detail
    job = compared({0: facts(), 1: facts(host="b", clock_offset_s=0.8)})
    assert check_clocks(job)[0] == WARN and check_versions(job)[0] == OK


def test_gloo_on_a_loopback_host_name_across_hosts_fails():
    from launch.node_checks import check_interfaces

    job = compared({0: facts(), 1: facts(host="b", gloo_address="127.0.1.1")})
    verdict, detail = check_interfaces(job)
    assert verdict == FAIL and "its host name b resolves to 127.0.1.1" in detail
    assert "set GLOO_SOCKET_IFNAME=eth0" in detail
    job = compared({0: facts(), 1: facts(host="b", gloo_address="127.0.1.1",
                                         env={"GLOO_SOCKET_IFNAME": "eth0"})})
    assert check_interfaces(job)[0] == OK


def test_socket_ifname_follows_nccls_rules():
    from launch.node_checks import matching_interfaces

    names = ["lo", "eth0", "eth1", "ib0"]
    assert matching_interfaces("eth", names) == ["eth0", "eth1"]
    assert matching_interfaces("^lo,ib", names) == ["eth0", "eth1"]
    assert matching_interfaces("=eth", names) == []
    assert matching_interfaces("eth1", names, exact=True) == ["eth1"]


@pytest.mark.slow
def test_unresolvable_master_fails():
    result = doctor("--cpu", "--nnodes", "2", "--node-rank", "1", "--master-addr",
                    "no-such-host.invalid", CONFIG)
    assert result.returncode == 1
    verdict, detail = rows(result.stdout)["master reachable"]
    assert verdict == FAIL and "no-such-host.invalid" in detail and "does not resolve" in detail


# One real command line; every message in process: tests/unit/test_bad_input.py.
@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
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
    assert verdict == WARN and f"moved to {tmp_path / 'replaced'}" in detail
    assert "deleted once the new run has written its first checkpoint" in detail


@pytest.mark.parametrize("scaled", [[], ["optim.scale_lr=linear"]])
def test_run_folder_with_checkpoints_resumes_on_another_world_size(
        tmp_path, scaled):
    cfg = load_config(CONFIG, [f"run.dir={tmp_path}", *scaled])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    files = Checkpoints(tmp_path / "checkpoints", keep=3)
    for step in (3, 6):
        files.save({"step": step, "epoch": 1, "batch_in_epoch": 0, "world_size": 2,
                    "config": identity(cfg)})
    (tmp_path / "checkpoints" / "step_00000009.pt").write_bytes(b"")  # damaged: skipped
    resumes = (OK, f"{tmp_path}: will resume from step_00000006.pt (epoch 2, step 6)")
    assert check_run_folder(job_for(CONFIG, f"run.dir={tmp_path}", *scaled)) == resumes
    # The same global batch, and the learning rate follows it (scaled or not): re-sharded.
    assert run_check(check_run_folder, job_for("--gpus", "3", CONFIG, f"run.dir={tmp_path}",
                                               *scaled)) == resumes
    verdict, detail = check_run_folder(job_for(CONFIG, f"run.dir={tmp_path}", *scaled,
                                               "checkpoint.resume=false"))
    assert verdict == OK and "starts over" in detail


def test_run_folder_in_use_by_another_job_fails(tmp_path):
    with RunLock(tmp_path):
        verdict, detail = run_check(check_run_folder, job_for(CONFIG, f"run.dir={tmp_path}"))
    assert verdict == FAIL and f"is in use by another job (pid {os.getpid()}" in detail
    assert check_run_folder(job_for(CONFIG, f"run.dir={tmp_path}"))[0] == OK  # released


@pytest.mark.parametrize("position, extra", [((6, 558), []),  # every epoch done
                                             ((0, 40), ["train.max_steps=40"])])
def test_a_complete_run_is_called_complete(tmp_path, position, extra):
    cfg = load_config(CONFIG, [f"run.dir={tmp_path}", *extra])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    epoch, step = position
    Checkpoints(tmp_path / "checkpoints", keep=3).save(
        {"step": step, "epoch": epoch, "batch_in_epoch": 0, "world_size": 2,
         "config": identity(cfg)})
    verdict, detail = check_run_folder(job_for(CONFIG, f"run.dir={tmp_path}", *extra))
    assert verdict == OK and f"{tmp_path}: complete (step_{step:08d}.pt" in detail
    assert "nothing left to train" in detail and "will resume" not in detail


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
