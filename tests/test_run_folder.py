"""One job per run folder, and nothing of an old run lost before the new one has a checkpoint:
planted with real launchers, workers and kills."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from common.lock import ABANDONED_S, RunLock, holder
from tests.helpers import PYTHON, REPO, free_port, run_cli, run_workers
from tests.jobs import CONFIG, RUN, gone_within, running

pytestmark = pytest.mark.slow
SHORT = [*RUN, "train.epochs=2"]


def files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def epochs(folder: Path) -> list[int]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines]


def test_a_second_job_in_a_busy_run_folder_is_refused_naming_the_first(tmp_path):
    # The first job holds the folder (its rank 0 stalls in step 3, so it cannot end early).
    with running("--cpu", CONFIG, *RUN, f"run.dir={tmp_path}", "checkpoint.every_steps=2",
                 "debug.stall_rank=0", "debug.stall_step=3", "debug.stall_seconds=300") as first:
        first.wait_for("debug: stalling")
        lock = json.loads((tmp_path / "job.lock").read_text())
        assert lock["pid"] in [p.pid for p in first.workers(count=2)]
        before = files(tmp_path)
        # The launcher refuses before starting any worker; torchrun's workers refuse too.
        second = run_cli("launch", "--cpu", CONFIG, *RUN, f"run.dir={tmp_path}")
        third = run_cli("torch.distributed.run", "--nproc-per-node=2",
                        f"--master-port={free_port()}", "-m", "train", CONFIG, *RUN,
                        f"run.dir={tmp_path}")
        assert files(tmp_path) == before  # neither wrote anything
        first.kill_all()
    named = f"is in use by another job (pid {lock['pid']} on {socket.gethostname()}"
    assert second.returncode == 2
    assert [line for line in second.stderr.splitlines() if line] == [
        f"error: {tmp_path} {named}, started {lock['started']}): two jobs in one run folder "
        f"would overwrite each other's checkpoints and metrics; wait for it to end, or choose "
        f"another run.dir (its lock: {tmp_path / 'job.lock'})"]
    assert "launch:" not in second.stdout  # refused before any worker started
    reported = [line for line in third.stderr.splitlines() if line.startswith("error:")]
    assert len(reported) == 1 and named in reported[0], third.stderr


def test_a_lock_whose_holder_was_killed_is_taken_over_with_a_warning(tmp_path):
    with running("--cpu", CONFIG, *SHORT, f"run.dir={tmp_path}") as dead:
        dead.wait_for("step 2/12")
        workers = dead.workers(count=2)
        dead.kill_all()  # kill -9 of every process: nobody removes the lock file
        assert gone_within(workers, 10)
    left = json.loads((tmp_path / "job.lock").read_text())
    assert holder(tmp_path) is None  # its holder is gone: free
    again = run_cli("launch", "--cpu", CONFIG, *SHORT, f"run.dir={tmp_path}")
    assert again.returncode == 0, again.stderr
    assert (f"{tmp_path / 'job.lock'}: took over the lock of pid {left['pid']} on "
            f"{left['host']}, started {left['started']}, which is gone") in again.stdout
    assert epochs(tmp_path) == [1, 2]


def test_a_lock_from_another_host_holds_while_renewed(tmp_path):
    """Where flock does not reach across nodes, the holder's renewals decide: a lock another
    host renewed lately is held; one not renewed for a minute is abandoned."""
    lock_file = tmp_path / "job.lock"
    lock_file.write_text(json.dumps({"host": "node-7", "pid": os.getpid(),
                                     "started": "yesterday", "job": None}))
    assert str(holder(tmp_path)) == f"pid {os.getpid()} on node-7, started yesterday"
    with pytest.raises(Exception, match="in use by another job .pid .* on node-7"):
        RunLock(tmp_path).acquire()
    old = time.time() - ABANDONED_S - 5
    os.utime(lock_file, (old, old))
    assert holder(tmp_path) is None
    with RunLock(tmp_path) as lock:
        assert lock.taken_over is not None and lock.taken_over.host == "node-7"
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    assert not lock_file.exists()


def test_a_failed_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(tmp_path):
    # The old run: the workers' own (tests.helpers.run_workers); replacing it is what this tests.
    first = run_workers(2, CONFIG, *SHORT, f"run.dir={tmp_path}", "train.max_steps=4")
    assert first.returncode == 0, first.stderr
    old = files(tmp_path)
    # Online wandb without credentials, the workers without the launcher's checks (as
    # torchrun starts them): refused before anything in the folder changes.
    refused = run_workers(2, CONFIG, *SHORT, f"run.dir={tmp_path}", "run.overwrite=true",
                          "optim.lr=0.05", "wandb.mode=online",
                          env={"WANDB_API_KEY": None, "NETRC": os.devnull})
    assert refused.returncode == 2
    assert [line for line in refused.stderr.splitlines() if line.strip()] == [
        "error: wandb.mode=online but no credentials: set WANDB_API_KEY or run `wandb "
        "login`, or use wandb.mode=offline and `wandb sync` later"]
    assert files(tmp_path) == old
    # A new run that dies before its first checkpoint (a full disk, planted): the old run
    # waits in replaced/, whole.
    new = [*SHORT, f"run.dir={tmp_path}", "optim.lr=0.05", "train.max_steps=4"]
    died = run_cli("launch", "--cpu", CONFIG, *new, "run.overwrite=true",
                   "checkpoint.every_steps=1", "debug.disk_full_step=1")
    assert died.returncode == 4, died.stderr
    assert {p.relative_to(tmp_path / "replaced"): data for p, data in
            files(tmp_path / "replaced").items()} == {p.relative_to(tmp_path): data
                                                      for p, data in old.items()}
    # The new run again: its first checkpoint makes the old one go.
    done = run_cli("launch", "--cpu", CONFIG, *new)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "replaced").exists()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 0.05


def test_a_replacement_killed_while_moving_the_old_run_aside_puts_it_back(tmp_path):
    # The old run: the workers' own (tests.helpers.run_workers), with the device `launch --cpu`
    # gives them, as the launch below records it in config.yaml.
    first = run_workers(2, CONFIG, *SHORT, f"run.dir={tmp_path}", "train.max_steps=14",
                        "dist.device=cpu")
    assert first.returncode == 0, first.stderr
    old = files(tmp_path)
    # The main worker of a replacing run, killed (SIGKILL) right after its first move.
    kill_after_one_move = (
        "import os, signal, sys, runpy\n"
        "real = os.rename\n"
        "def rename(a, b):\n"
        "    real(a, b)\n"
        "    if 'replaced.partial' in str(b): os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.rename = rename\n"
        "sys.argv = ['train', *sys.argv[1:]]\n"
        "runpy.run_module('train', run_name='__main__')\n")
    killed = subprocess.run([PYTHON, "-c", kill_after_one_move, CONFIG, *SHORT,
                             f"run.dir={tmp_path}", "run.overwrite=true", "optim.lr=0.05"],
                            cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert killed.returncode == -9, killed.stderr
    assert (tmp_path / "replaced.partial").is_dir()  # half moved
    again = run_cli("launch", "--cpu", CONFIG, *SHORT, f"run.dir={tmp_path}",
                    "train.max_steps=14")
    assert again.returncode == 0, again.stderr
    assert "put back the files of the run that an interrupted replacement was moving" in (
        again.stdout + again.stderr)
    assert "is complete (step 14 of 14" in again.stdout  # its checkpoints are back
    assert not (tmp_path / "replaced.partial").exists()
    assert (tmp_path / "config.yaml").read_bytes() == old[tmp_path / "config.yaml"]
