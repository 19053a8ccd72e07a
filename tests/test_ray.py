"""Ray Train as the engine, for real: a local Ray instance with 2 CPU workers, one of them
killed with SIGKILL after a checkpoint, is restarted by Ray, resumes from our checkpoint and
ends exactly where torchrun's uninterrupted run with the same global batch ends. Ray is optional
(requirements-ray.txt, which .ci/run installs): without it this test skips."""

from __future__ import annotations

import signal
from pathlib import Path

import psutil
import pytest
import torch

from tests.helpers import run_workers
from tests.jobs import CONFIG, RUN, running

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_train():
    """Skips here without ray[train]. A fixture, not at import: importing ray.train (pandas,
    pyarrow) took 3 s of every pytest process's collection, test_ray.py run there or not."""
    pytest.importorskip("ray.train.torch", reason="ray[train] is not installed: "
                        "pip install -r requirements-ray.txt")
# 2 epochs of 12 steps, one thread per worker, as the torchrun run does.
SHORT = [*RUN, "train.epochs=2", "dist.cpu_threads=1"]


def model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory) -> Path:
    """The reference: 2 workers as torchrun starts them, uninterrupted (run_workers)."""
    run_dir = tmp_path_factory.mktemp("torchrun")
    result = run_workers(2, CONFIG, *SHORT, "dist.device=cpu", f"run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir


def ray_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--workers", "2", "--storage", str(tmp_path / "ray"), *extra, CONFIG, *SHORT,
            f"run.dir={tmp_path / 'run'}"]


def test_two_ray_workers_one_killed_by_sigkill_resume_and_end_as_torchrun(tmp_path,
                                                                       torchrun_run):
    """One local Ray start: its 2 workers train as torchrun's 2 do, and after one is killed Ray
    restarts the group, which resumes; the end is torchrun's bit for bit, so every step before
    and after the kill was torchrun's. (A run without a kill is the part of this one before
    it; with a second Ray start for it the file's tests took 75 s in run Q of
    docs/performance.md, against 61 s in run R.)"""
    checkpoints = tmp_path / "run" / "checkpoints"
    with running(*ray_args(tmp_path, "--max-failures", "2"), "checkpoint.every_steps=4",
                 module="launch.ray") as job:
        job.wait_for_file(checkpoints / "step_00000004.pt.sha256", timeout=400)
        workers = [p for p in psutil.Process(job.proc.pid).children(recursive=True)
                   if p.cmdline()[1:3] == ["-m", "train"]]
        assert len(workers) == 2, [p.cmdline() for p in workers]
        workers[-1].send_signal(signal.SIGKILL)
        assert job.finish(timeout=600) == 0, job.output()[-3000:]
    assert "launch.ray: 2 Ray worker(s), run folder" in job.out()
    assert "resumed from" in job.out()
    assert equal(model(tmp_path / "run"), model(torchrun_run))
