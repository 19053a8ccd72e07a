"""Checkpoints that survive a crash at any moment, a power loss, and a full disk: planted with
real kills, real files and a real (small) file system."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

import common.files
from tests.helpers import run_cli, run_single, run_workers
from tests.jobs import CONFIG, RUN, gone_within, running
from train.run.checkpoint import Checkpoints

pytestmark = pytest.mark.slow
SHORT = [*RUN, "train.epochs=2"]  # 24 steps


def state(step: int) -> dict:
    torch.manual_seed(step)
    return {"step": step, "model": {"w": torch.randn(64, 64)}}


def kill_at_every_moment_of_a_save(folder: str) -> list[tuple[int, int, int]]:
    """Save step 20 over steps 5 and 10 (keep=2), SIGKILLed before its k-th file-system call,
    for k = 1, 2, ... until a save completes; after each: (k, the step load_latest finds,
    the step of last.pt)."""
    moments = []
    for k in range(1, 100):
        run = Path(folder) / f"k{k}"
        store = Checkpoints(run, keep=2)
        store.save(state(5))
        store.save(state(10))
        pid = os.fork()
        if pid == 0:
            _save_killed_at(store, k)
        _, status = os.waitpid(pid, 0)
        found = store.load_latest()
        last = torch.load(run / "last.pt", weights_only=True)["step"]
        moments.append((k, found[1]["step"], last))
        assert torch.equal(found[1]["model"]["w"], state(found[1]["step"])["model"]["w"])
        if not os.WIFSIGNALED(status):
            return moments
    raise AssertionError("the save never completed")


def _save_killed_at(store: Checkpoints, k: int) -> None:
    """In a forked child: save step 20, SIGKILLed just before its k-th file-system call."""
    count = [0]

    def before(fn):
        def call(*args, **kwargs):
            count[0] += 1
            if count[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return call

    for name in ("fsync_file", "fsync_folder"):
        setattr(common.files, name, before(getattr(common.files, name)))
    os.replace, os.link = before(os.replace), before(os.link)
    pathlib.Path.unlink = before(pathlib.Path.unlink)
    pathlib.Path.write_text = before(pathlib.Path.write_text)
    Checkpoints._write_blob = before(Checkpoints._write_blob)
    store.save(state(20))
    os._exit(0)


def test_a_kill_at_any_moment_of_a_save_leaves_a_valid_checkpoint(tmp_path):
    moments = run_single(kill_at_every_moment_of_a_save, str(tmp_path))
    assert len(moments) >= 12  # three writes of four steps each, the rotation
    assert all(found in (10, 20) and last in (10, 20) for _, found, last in moments), moments
    # Found steps only move forward (10 ... 10, 20 ... 20), and last.pt never runs ahead.
    steps = [found for _, found, _ in moments]
    assert steps == sorted(steps) and steps[0] == 10 and steps[-1] == 20
    assert all(last <= found for _, found, last in moments)
    assert moments[-1][1:] == (20, 20)


def test_what_a_power_loss_leaves_is_skipped(tmp_path):
    """An empty newest step file without its .sha256 (last.pt, its hard link, empty too) and
    a temp file left behind: the run resumes from the checkpoint before, and cleans up."""
    first = run_workers(2, CONFIG, *SHORT, f"run.dir={tmp_path}", "checkpoint.every_steps=5",
                        "checkpoint.keep=3")
    assert first.returncode == 0, first.stderr
    folder = tmp_path / "checkpoints"
    newest = folder / "step_00000024.pt"
    newest.open("w").close()  # in place: last.pt is the same file
    (folder / "step_00000024.pt.sha256").unlink()
    leftover = folder / ".step_00000025.pt.tmp"
    leftover.write_bytes(b"half a checkpoint")
    assert (folder / "last.pt").stat().st_size == 0
    again = run_workers(2, CONFIG, *SHORT, f"run.dir={tmp_path}", "checkpoint.every_steps=5",
                        "checkpoint.keep=3")
    assert again.returncode == 0, again.stderr
    assert f"skipping checkpoint {newest}: the file is empty" in again.stdout + again.stderr
    assert f"resumed from {folder / 'step_00000020.pt'}" in again.stdout
    assert torch.load(folder / "last.pt", weights_only=True)["step"] == 24
    assert not leftover.exists()


def test_a_planted_full_disk_stops_every_rank_together_with_one_line(tmp_path):
    """The workers alone (run_workers, which asserts that every rank exits alike): exit 4, and
    the whole output of both ranks on stderr is the one line."""
    result = run_workers(2, CONFIG, *SHORT, f"run.dir={tmp_path}", "checkpoint.every_steps=2",
                         "debug.disk_full_step=6")
    assert result.returncode == 4, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors == [f"error: no space left on the device of {tmp_path} writing step 6; the "
                      f"last valid checkpoint is step 4: free some space, then run the same "
                      f"command to resume"], result.stderr
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["last.pt", "step_00000002.pt", "step_00000002.pt.sha256",
                    "step_00000004.pt", "step_00000004.pt.sha256"]  # no temp file
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["step"] == 4


def test_a_full_disk_under_fsdp_is_the_same_one_line_and_leaves_no_temp_folder(tmp_path):
    """DCP's write fails on the last rank only (planted): every rank learns it from DCP, the
    launcher exits 4 with the line the DDP path prints above, and no traceback anywhere."""
    result = run_cli("launch", "--cpu", CONFIG, *SHORT, "mode=fsdp", f"run.dir={tmp_path}",
                     "checkpoint.every_steps=2", "debug.disk_full_step=6")
    assert result.returncode == 4, result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: no space left on the device of {tmp_path} writing step 6; the "
                      f"last valid checkpoint is step 4: free some space, then run the same "
                      f"command to resume"], result.stderr
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["last.pt", "step_00000002", "step_00000002.pt", "step_00000002.pt.sha256",
                    "step_00000004", "step_00000004.pt", "step_00000004.pt.sha256"]  # no .tmp
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["step"] == 4


@pytest.fixture
def small_disk(tmp_path):
    """A 300 MiB tmpfs of our own (enough for the launcher's disk check), unmounted after."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300m", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the planted full "
                    f"disk test above covers the same path")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill_up(disk: Path, leave: int = 512 * 1024) -> None:
    """Take all but about `leave` bytes of `disk`; the run writes meanwhile, so what is free
    can shrink between reading it and taking it: take a little less then."""
    with (disk / "ballast").open("wb") as ballast:
        for _ in range(20):
            try:
                os.posix_fallocate(ballast.fileno(), 0, shutil.disk_usage(disk).free - leave)
                return
            except OSError:
                leave += 256 * 1024
    raise AssertionError(f"could not fill {disk}")


def test_a_disk_that_fills_up_during_training_stops_the_job_with_one_line(small_disk):
    """Another job fills the disk after the first checkpoint: the next one cannot be written."""
    run_dir = small_disk / "run"
    with running("--cpu", CONFIG, *RUN, f"run.dir={run_dir}", "checkpoint.every_steps=2") as job:
        job.wait_for_file(run_dir / "checkpoints" / "step_*.pt.sha256")
        workers = job.workers(count=2)
        fill_up(small_disk)
        assert job.finish() == 4, job.output()
        assert gone_within(workers, 10)
    errors = [line for line in job.err() if line.startswith("error:")]
    assert len(errors) == 1, job.err()
    found = re.fullmatch(rf"error: no space left on the device of {run_dir} writing step (\d+); "
                         r"the last valid checkpoint is step (\d+): free some space, then run "
                         r"the same command to resume", errors[0])
    assert found, errors[0]
    failed, last = map(int, found.groups())
    assert failed == last + 2
    names = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert f"step_{failed:08d}.pt" not in names and not any(n.endswith(".tmp") for n in names)
    assert Checkpoints(run_dir / "checkpoints", keep=2).load_latest()[1]["step"] == last
