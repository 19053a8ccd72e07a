"""Checkpoints, resume, restarts, signals, timeouts and rendezvous, with real processes.

What the launcher and torchrun do (restarts, signals from outside, rendezvous, nodes) goes
through the real CLI. What the workers decide alone (where a stop lands, which checkpoint is
valid, how a longer run's schedule continues) runs the workers' own `main` in gloo processes
forked by the harness (`tests.helpers.run_workers`), as does the uninterrupted reference."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.helpers import (
    PYTHON,
    REPO,
    free_port,
    run_cli,
    run_workers,
    start_nodes,
)
from train.run.checkpoint import Checkpoints

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "default.yaml")
# 12 steps per epoch, 4 epochs; stop requests are agreed every 5 steps, so a stop always
# lands inside an epoch (48 steps, no multiple of 5 is a multiple of 12).
RUN = ["data.synthetic.train_samples=1536", "data.synthetic.test_samples=301",
       "train.batch_size=128", "train.epochs=4", "wandb.mode=disabled", "log.every_steps=4"]


def params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run_workers(2, CONFIG, *RUN, f"run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir


def start(run_dir: Path, *extra: str, new_session: bool = False) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "launch", "--cpu", CONFIG, *RUN, f"run.dir={run_dir}",
                             *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=new_session,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list((run_dir / "checkpoints").glob("step_*.pt")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.1)


def workers_of(proc: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def assert_all_gone(processes: list[psutil.Process], within: float = 10) -> None:
    _, alive = psutil.wait_procs(processes, timeout=within)
    assert not alive, f"left behind: {[p.pid for p in alive]}"


@pytest.mark.serial  # bounds its time: away from the CPU-bound tests (tests/suite.py)
@pytest.mark.parametrize("how", [
    pytest.param("SIGTERM to the launcher", marks=pytest.mark.compat),  # torchrun's agent too
    "Ctrl-C to the process group"])
def test_interrupt_checkpoints_at_a_step_boundary_and_resume_is_bitwise(tmp_path, uninterrupted,
                                                                        how):
    proc = start(tmp_path, "checkpoint.every_steps=100", new_session=True)
    _wait_for_steps(proc)
    children = workers_of(proc)
    assert len(children) >= 2
    sent = time.monotonic()
    if how.startswith("SIGTERM"):
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 30
    assert proc.returncode == 130, err
    assert "interrupted" in err and "resume" in err
    assert_all_gone(children)
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < saved["step"] < 48 and saved["step"] % 5 == 0
    assert saved["batch_in_epoch"] == saved["step"] % 12 != 0  # inside an epoch

    again = run_cli("launch", "--cpu", CONFIG, *RUN, f"run.dir={tmp_path}",
                    "checkpoint.every_steps=100")
    assert again.returncode == 0, again.stderr
    assert f"resumed from {tmp_path / 'checkpoints'}" in again.stdout
    assert_bitwise_equal(params(tmp_path), params(uninterrupted))
    assert _summary(tmp_path)["steps"] == 48  # no step done twice, none skipped
    assert _metrics(tmp_path) == _metrics(uninterrupted)  # epoch figures survive the stop


def test_a_stop_at_an_epochs_last_step_finishes_that_epoch_first(tmp_path):
    # 10 steps per epoch; a SIGTERM after step 8 is agreed on at step 10, the epoch's last.
    short = ["data.synthetic.train_samples=1280", "train.epochs=3"]
    whole = run_workers(2, CONFIG, *RUN, *short, f"run.dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr
    run_dir = tmp_path / "stopped"
    stopped = run_workers(2, CONFIG, *RUN, *short, f"run.dir={run_dir}", "debug.sigterm_rank=1",
                          "debug.sigterm_step=8")
    assert stopped.returncode == 130, stopped.stderr
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"], saved["batch_in_epoch"]) == (1, 10, 0)
    assert len(_metrics(run_dir)) == 1  # the epoch was evaluated and recorded before stopping

    again = run_workers(2, CONFIG, *RUN, *short, f"run.dir={run_dir}")
    assert again.returncode == 0, again.stderr
    assert _metrics(run_dir) == _metrics(tmp_path / "whole")
    assert_bitwise_equal(params(run_dir), params(tmp_path / "whole"))


def _wait_for_steps(proc: subprocess.Popen) -> None:
    """Until the first epoch has produced a step log line (training is under way)."""
    deadline = time.monotonic() + 120
    while True:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, proc.communicate()
        if "step 4/12" in line:
            return
        assert time.monotonic() < deadline


def _summary(run_dir: Path) -> dict:
    import json

    return json.loads((run_dir / "summary.json").read_text())


def _metrics(run_dir: Path) -> list[tuple]:
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["epoch"], r["step"], r["train_loss"], r["test_accuracy"])
            for r in map(json.loads, lines)]


def test_a_killed_worker_restarts_the_group_which_resumes(tmp_path, uninterrupted):
    proc = start(tmp_path, "--max-restarts", "1", "checkpoint.every_steps=4")
    wait_for_checkpoint(tmp_path, proc)
    victim = workers_of(proc)[-1]
    victim.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert out.count("resumed from") == 1
    assert_bitwise_equal(params(tmp_path), params(uninterrupted))


@pytest.mark.serial  # bounds its time: away from the CPU-bound tests (tests/suite.py)
def test_a_stalled_worker_makes_everyone_exit_with_a_message(tmp_path):
    started = time.monotonic()
    proc = start(tmp_path, "dist.timeout_s=5", "debug.stall_rank=1", "debug.stall_step=3",
                 "debug.stall_seconds=120")
    _wait_for_steps_started(proc)
    children = workers_of(proc)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 3, err
    assert time.monotonic() - started < 60
    message = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(message) == 1
    assert "a collective failed at step 3" in message[0]
    assert "dist.timeout_s=5 s" in message[0]
    assert_all_gone(children)
    # Every rank wrote where it was; the launcher's block names the rank that never came.
    block = err[err.index("hang: "):].splitlines()
    assert block[0].startswith("hang: rank(s) 1 did not reach the collective that rank(s) 0 "
                               "waited in, at step 3"), err
    assert block[1].startswith("  rank 1 ") and "did not reach it" in block[1]
    assert "at train/loop/faults.py:" in block[1] and "in inside_step" in block[1]
    assert block[2].startswith("  rank 0 ") and "waited in it" in block[2]
    assert "at train/optim.py:" in block[2] and "Timed out" in block[2]
    records = {r: json.loads((tmp_path / "hang" / f"rank_{r}.json").read_text()) for r in (0, 1)}
    assert [records[r]["waiting"] for r in (0, 1)] == [True, False]
    assert {records[r]["step"] for r in (0, 1)} == {3}
    stalled = (tmp_path / "hang" / "rank_1.txt").read_text()
    assert "inside_step" in stalled and "Thread" in stalled  # every thread's stack
    assert "The call that waited" in (tmp_path / "hang" / "rank_0.txt").read_text()


def test_a_worker_killed_by_a_fatal_signal_leaves_its_stacks(tmp_path):
    """The NCCL path's CPU twin: NCCL's watchdog aborts a rank whose collective timed out, and
    no Python code runs then; faulthandler's dump reaches the run folder through the launcher."""
    proc = start(tmp_path, "checkpoint.every_steps=100")
    _wait_for_steps(proc)
    victim = next(p for p in workers_of(proc) if _environ(p).get("RANK") == "1")
    victim.send_signal(signal.SIGABRT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGABRT, err
    assert "worker rank 1 was killed by signal 6" in err
    dump = tmp_path / "hang" / "rank_1.fatal.txt"
    assert dump.read_text().startswith("Fatal Python error: Aborted")
    line = next(li for li in err.splitlines() if li.startswith("  rank 1"))
    assert "killed by a signal" in line and "fatal python error: aborted" in line
    # the innermost frame of our code: wherever rank 1 happened to be (a step, the bookkeeping
    # between steps in common/), one location, never torch's
    assert len(re.findall(r" at (?:train|models|common)/[\w/]+\.py:\d+ in \w+;", line)) == 1, line
    # The launcher moved it: nothing is left under this launcher's name (a file of another
    # process that had the same pid before may be, e.g. one killed by SIGKILL).
    assert not (Path(tempfile.gettempdir()) / f"dptrain-fatal-{proc.pid}-{victim.pid}.txt").exists()


def _environ(process: psutil.Process) -> dict[str, str]:
    try:
        return process.environ()
    except psutil.Error:
        return {}


def _wait_for_steps_started(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the launcher's workers exist (a deadline that passes fails the test: an empty
    list of workers would make the check that they are all gone pass by itself)."""
    deadline = time.monotonic() + timeout
    while not workers_of(proc):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the workers never started"
        time.sleep(0.05)


def test_damaged_checkpoints_are_skipped_for_the_previous_one(tmp_path, uninterrupted):
    first = run_workers(2, CONFIG, *RUN, f"run.dir={tmp_path}", "checkpoint.every_steps=5",
                        "checkpoint.keep=3")
    assert first.returncode == 0, first.stderr
    store = Checkpoints(tmp_path / "checkpoints", keep=3)
    newest, older = store.candidates()[:2]
    assert [p.name for p in store.candidates()] == [
        "step_00000048.pt", "step_00000045.pt", "step_00000040.pt"]  # the last 3 kept
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: torch.load alone would not notice
    newest.write_bytes(bytes(data))
    second = run_workers(2, CONFIG, *RUN, f"run.dir={tmp_path}", "checkpoint.every_steps=5",
                         "checkpoint.keep=3")
    assert second.returncode == 0, second.stderr
    assert f"skipping checkpoint {newest}" in second.stdout + second.stderr
    assert f"resumed from {older}" in second.stdout
    assert_bitwise_equal(params(tmp_path), params(uninterrupted))

    for path in store.candidates():
        path.write_bytes(path.read_bytes()[:1000])  # truncated, as by a crash mid-write
    third = run_workers(2, CONFIG, *RUN, f"run.dir={tmp_path}", "checkpoint.every_steps=5",
                        "checkpoint.keep=3")
    assert third.returncode == 2
    assert "no valid checkpoint in" in third.stderr


def test_checkpoint_holds_the_full_state_and_loads_on_the_workers_device(uninterrupted):
    state = Checkpoints(uninterrupted / "checkpoints", keep=2).load_latest()
    assert state is not None
    path, saved = state
    assert {"model", "optimizer", "scheduler", "epoch", "step", "batch_in_epoch", "ranks",
            "world_size", "config", "wandb_run_id"} <= saved.keys()
    assert (saved["epoch"], saved["step"], saved["world_size"]) == (4, 48, 2)
    assert len(saved["ranks"]) == 2
    assert {"torch", "numpy", "python"} <= saved["ranks"][1]["rng"].keys()
    assert saved["config"]["train.batch_size"] == 128
    assert not any(k.startswith("module.") for k in saved["model"])
    assert all(t.device.type == "cpu" for t in saved["model"].values())
    # On GPUs: tests/test_gpu_path.py resumes through the trainer and checks where it all lands.


def test_resubmitted_on_another_worker_count_the_run_continues_in_its_folder(tmp_path,
                                                                              uninterrupted):
    # The default folder (runs/ under the current folder), as a user resubmits after a
    # preemption: the first job ran on 2 workers and its last checkpoint is step 40.
    half = run_cli("launch", "--cpu", CONFIG, *RUN, "checkpoint.every_steps=20", cwd=tmp_path)
    assert half.returncode == 0, half.stderr
    runs = [p for p in (tmp_path / "runs").iterdir() if p.name != "latest"]
    assert len(runs) == 1
    store = Checkpoints(runs[0] / "checkpoints", keep=2)
    for path in store.candidates()[:1]:  # keep only the mid-run checkpoint (step 40)
        path.unlink()
    again = run_cli("launch", "--cpu", "--gpus", "1", CONFIG, *RUN, "checkpoint.every_steps=20",
                    cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"run folder: {Path('runs') / runs[0].name}" in again.stdout
    assert ("world size 2 -> 1 workers (resubmitted on another worker count): "
            "step_00000040.pt continues at step 40") in again.stdout
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([runs[0].name,
                                                                           "latest"])
    # The same global batches, re-sharded over one worker: equal up to summation order.
    for name, value in params(uninterrupted).items():
        torch.testing.assert_close(params(runs[0])[name], value, rtol=1e-4, atol=1e-6)


def test_resuming_with_another_config_names_the_difference(tmp_path):
    first = run_cli("launch", "--cpu", CONFIG, *RUN, f"run.dir={tmp_path}", "train.max_steps=6")
    assert first.returncode == 0, first.stderr
    refused = run_cli("launch", "--cpu", CONFIG, *RUN, f"run.dir={tmp_path}", "optim.lr=0.05")
    assert refused.returncode == 2
    assert "optim.lr: 0.1 -> 0.05" in refused.stderr
    assert "checkpoint.allow_changes=true" in refused.stderr


def two_nodes(*per_node: list[str], timeout: float = 240) -> list[tuple[int, str]]:
    """Two launchers on this machine acting as nodes 0 and 1 of one job, each with its own
    overrides; (exit code, stderr) of each."""
    nodes = start_nodes("2", [[CONFIG, *RUN, *extra] for extra in per_node])
    outputs = [node.communicate(timeout=timeout) for node in nodes]
    return [(node.returncode, err) for node, (_, err) in zip(nodes, outputs, strict=True)]


def test_two_launchers_act_as_two_nodes(tmp_path, uninterrupted):
    same = [f"run.dir={tmp_path}", "dist.cpu_threads=1"]
    for code, err in two_nodes(same, same):
        assert code == 0, err
    assert _summary(tmp_path)["world_size"] == 2
    # One thread per worker, as in the one-node run: the same arithmetic, the same result.
    assert_bitwise_equal(params(tmp_path), params(uninterrupted))


@pytest.mark.serial  # bounds its time: away from the CPU-bound tests (tests/suite.py)
def test_a_node_that_never_arrives_fails_after_the_rendezvous_timeout(tmp_path):
    started = time.monotonic()
    result = run_cli("launch", "--cpu", "--gpus", "1", "--nnodes", "2", "--node-rank", "0",
                     "--master-addr", "127.0.0.1", "--master-port", str(free_port()), CONFIG,
                     *RUN, f"run.dir={tmp_path}", "dist.rendezvous_timeout_s=5", timeout=120)
    assert result.returncode != 0
    assert "not every node joined the rendezvous within 5 s" in result.stderr
    assert time.monotonic() - started < 90


def test_a_busy_explicit_port_is_a_clear_error_and_the_default_finds_a_free_one(tmp_path):
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        refused = run_cli("launch", "--cpu", "--master-port", str(port), CONFIG, *RUN,
                          f"run.dir={tmp_path / 'a'}")
        assert refused.returncode == 2
        assert f"port {port} is already in use" in refused.stderr
        fine = run_cli("launch", "--cpu", CONFIG, *RUN, "train.max_steps=2",
                       f"run.dir={tmp_path / 'b'}")
        assert fine.returncode == 0, fine.stderr


@pytest.mark.serial  # bounds its time: away from the CPU-bound tests (tests/suite.py)
def test_a_node_whose_node_0_never_comes_fails_after_the_rendezvous_timeout(tmp_path):
    port = free_port()  # nothing listens there: node 0 never started
    started = time.monotonic()
    result = run_cli("launch", "--cpu", "--gpus", "1", "--nnodes", "2", "--node-rank", "1",
                     "--master-addr", "127.0.0.1", "--master-port", str(port), CONFIG, *RUN,
                     f"run.dir={tmp_path}", "dist.rendezvous_timeout_s=5", timeout=120)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr  # no traceback, no C++ stack dump
    assert lines[0].startswith(f"error: no rendezvous answered at 127.0.0.1:{port} within 5 s")
    assert time.monotonic() - started < 40  # torch's c10d client alone waits 60 s by default


@pytest.mark.serial  # bounds its time: away from the CPU-bound tests (tests/suite.py)
def test_torchruns_own_wait_for_node_0_follows_the_rendezvous_timeout(tmp_path, capsys):
    """Past the launcher's own wait (node 0 went away just after answering), torch's c10d
    client gives up after read_timeout = dist.rendezvous_timeout_s, not its default 60 s."""
    from launch.agent import run_torchrun
    from launch.cli import parse_args
    from launch.plan import make_plan

    port = free_port()
    plan = make_plan(parse_args([
        "--cpu", "--gpus", "1", "--nnodes", "2", "--node-rank", "1", "--master-addr",
        "127.0.0.1", "--master-port", str(port), CONFIG, *RUN, f"run.dir={tmp_path}",
        "dist.rendezvous_timeout_s=3"]))
    started = time.monotonic()
    assert run_torchrun(plan.torchrun_args, rendezvous_timeout_s=3) == 1
    assert time.monotonic() - started < 30
    assert f"no rendezvous answered at 127.0.0.1:{port} within 3 s" in capsys.readouterr().err


def test_a_killed_dp_launcher_leaves_no_orphan(tmp_path):
    proc = start(tmp_path, "--mode", "dp")
    _wait_for_steps(proc)
    children = workers_of(proc)
    assert children
    proc.kill()  # SIGKILL: the launcher cannot pass anything on
    try:
        assert_all_gone(children, within=30)
    finally:
        for child in children:  # never leave one behind, even when the test fails
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    out, err = proc.communicate(timeout=30)
    assert "interrupted by SIGTERM: stopped after step" in out + err  # it checkpointed


def test_nodes_that_see_different_run_folders_are_stopped_before_training(tmp_path,
                                                                         uninterrupted):
    """One node finds a checkpoint, the other (no shared file system) finds none. (c10d hands
    out ranks in arrival order: either node may hold rank 0.)"""
    elsewhere = tmp_path / "elsewhere"
    results = two_nodes([f"run.dir={uninterrupted}", "run.name=same-job"],
                        [f"run.dir={elsewhere}", "run.name=same-job"], timeout=180)
    assert [code for code, _ in results] == [2, 2]
    errors = "".join(err for _, err in results)
    assert ("rank 0 resumes from step_00000048.pt but rank 1 from nothing" in errors
            or "rank 0 resumes from nothing but rank 1 from step_00000048.pt" in errors), errors
    assert "shared file system" in errors
    assert not (elsewhere / "checkpoints").exists()  # nothing trained from step 0


@pytest.mark.parametrize("change", ["train.batch_size=64", "seed=1",
                                    "data.synthetic.train_samples=1024"])
def test_allowed_changes_cannot_move_a_position_inside_an_epoch(change):
    from common.errors import UserError
    from train.config import load_config
    from train.run.identity import check_resumable, identity

    old = load_config(CONFIG, RUN)
    state = {"config": identity(old), "world_size": 2, "batch_in_epoch": 5}
    new = load_config(CONFIG, [*RUN, change, "checkpoint.allow_changes=true"])
    with pytest.raises(UserError, match=f"{change.split('=')[0]} changed"):
        check_resumable(new, state, "checkpoint x")
    state["batch_in_epoch"] = 0  # at an epoch's end the same change is fine
    check_resumable(new, state, "checkpoint x")


def test_extending_a_finished_run_recomputes_the_schedule_over_the_new_length(tmp_path):
    """train.epochs 2 -> 3 with allow_changes: the cosine continues as the 3-epoch one would
    from step 24 (timm's and Lightning's choice), from the first new step on."""
    from train.config import load_config
    from train.lr import LrPlan

    two = ["train.epochs=2", f"run.dir={tmp_path}"]
    first = run_workers(2, CONFIG, *RUN, *two)
    assert first.returncode == 0, first.stderr
    longer = run_workers(2, CONFIG, *RUN, *two, "train.epochs=3", "checkpoint.allow_changes=true",
                         "checkpoint.every_steps=1", "checkpoint.keep=20")
    assert longer.returncode == 0, longer.stderr
    cfg = load_config(CONFIG, [*RUN, "train.epochs=3"]).optim
    plan = LrPlan.of(cfg, cfg.lr, 36, 12)  # 12 steps per epoch
    assert (f"learning rate recomputed for this config from step 24: "
            f"{cfg.lr * plan(24):.4g} (the checkpoint's schedule: 0)"
            in longer.stdout), longer.stdout
    saved = {step: torch.load(tmp_path / "checkpoints" / f"step_{step:08d}.pt",
                              weights_only=True) for step in (24, 25, 36)}
    lr = {step: s["optimizer"]["param_groups"][0]["lr"] for step, s in saved.items()}
    assert lr[25] == pytest.approx(cfg.lr * plan(25))
    assert lr[36] == pytest.approx(cfg.min_lr)
    # Step 25 trained at the new schedule's LR, not at the old one's end (0: no change).
    assert any(not torch.equal(saved[24]["model"][k], saved[25]["model"][k])
               for k in saved[24]["model"])
