"""The preemption contract with real signals (docs/fault-tolerance.md#one-preemption-contract):
SIGUSR1 (SLURM's warning before the time limit) stops a job like SIGTERM, through torchrun; and a
grace period shorter than the stop's checkpoint write leaves the previous checkpoint valid and
claims nothing that is not on disk. Kubernetes' SIGTERM to a pod: tests/test_k8s_contract.py."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from launch.plan import SHUTDOWN_TIMEOUT_S
from tests.helpers import run_cli, run_workers
from tests.jobs import CONFIG, RUN, gone_within, running
from train.run.checkpoint import Checkpoints

pytestmark = [pytest.mark.slow, pytest.mark.serial]
SHORT = [*RUN, "train.epochs=2"]  # 12 steps per epoch, 24 in all


def model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_sigusr1_stops_at_a_step_boundary_like_sigterm_and_the_run_resumes_bitwise(tmp_path):
    whole = tmp_path / "whole"
    # The reference: the workers' own run, uninterrupted (tests.helpers.run_workers).
    assert run_workers(2, CONFIG, *SHORT, f"run.dir={whole}").returncode == 0
    stopped = tmp_path / "stopped"
    with running("--cpu", CONFIG, *SHORT, f"run.dir={stopped}",
                 "checkpoint.every_steps=100") as job:
        job.wait_for("step 3/12")
        processes = job.workers(count=2)
        job.proc.send_signal(signal.SIGUSR1)
        assert job.finish(timeout=60) == 130, job.output()
        assert gone_within(processes, 10)
    saved = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)
    assert 3 <= saved["step"] < 12 and saved["batch_in_epoch"] == saved["step"]
    assert job.err() == [f"launch: interrupted by SIGUSR1; the workers stopped at step "
                         f"{saved['step']} and wrote a checkpoint there: run the same command "
                         f"to resume"]
    again = run_cli("launch", "--cpu", CONFIG, *SHORT, f"run.dir={stopped}",
                    "checkpoint.every_steps=100")
    assert again.returncode == 0, again.stderr
    assert f"resumed from {stopped / 'checkpoints'}" in again.stdout
    final, reference = model(stopped), model(whole)
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_a_grace_period_shorter_than_the_write_keeps_the_previous_checkpoint(tmp_path):
    """The stop's checkpoint write (from step 13 on, planted to take 300 s) outlasts torchrun's
    grace period (SHUTDOWN_TIMEOUT_S), which then kills the workers: the half-written file is
    not a checkpoint, step 12's stays valid, and the launcher names step 12, not the stop's."""
    with running("--cpu", CONFIG, *SHORT, f"run.dir={tmp_path}", "checkpoint.every_steps=100",
                 "debug.slow_save_step=13", "debug.slow_save_seconds=300") as job:
        job.wait_for("epoch 2/2 step 1/12")  # past step 12, whose checkpoint is written
        processes = job.workers(count=2)
        sent = time.monotonic()
        job.proc.send_signal(signal.SIGUSR1)
        job.wait_for_file(tmp_path / "checkpoints" / ".step_*.tmp")  # the stop's write began
        assert job.finish(timeout=SHUTDOWN_TIMEOUT_S + 60) == 130, job.output()
        assert SHUTDOWN_TIMEOUT_S <= time.monotonic() - sent < SHUTDOWN_TIMEOUT_S + 30
        assert gone_within(processes, 10)
    files = Checkpoints(tmp_path / "checkpoints", keep=2)
    assert files.newest_complete() == 12
    path, state = files.load_latest()
    assert (path.name, state["step"]) == ("step_00000012.pt", 12)
    assert job.err()[-1] == ("launch: interrupted by SIGUSR1; no checkpoint was written for "
                             "this stop (a worker did not reach a step boundary, or the write "
                             "did not finish, in time): the last one is step 12; run the same "
                             "command to resume from it")
