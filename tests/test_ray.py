"""Ray Train as the engine, for real: a local Ray instance with 2 CPU workers trains exactly as
torchrun does with the same global batch, and a worker killed with SIGKILL is restarted by Ray
and resumes from our checkpoint, ending where an uninterrupted run ends. Ray is optional
(requirements-ray.txt, which .ci/run installs): without it these tests skip."""

from __future__ import annotations

import signal
from pathlib import Path

import psutil
import pytest
import torch

from tests.helpers import run_cli
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
    run_dir = tmp_path_factory.mktemp("torchrun")
    result = run_cli("launch", "--cpu", "--gpus", "2", CONFIG, *SHORT, f"run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir


def ray_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--workers", "2", "--storage", str(tmp_path / "ray"), *extra, CONFIG, *SHORT,
            f"run.dir={tmp_path / 'run'}"]


def test_two_ray_workers_train_exactly_as_torchrun(tmp_path, torchrun_run):
    result = run_cli("launch.ray", *ray_args(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert equal(model(tmp_path / "run"), model(torchrun_run))


def test_a_worker_killed_by_sigkill_is_restarted_by_ray_and_resumes(tmp_path, torchrun_run):
    checkpoints = tmp_path / "run" / "checkpoints"
    with running(*ray_args(tmp_path, "--max-failures", "2"), "checkpoint.every_steps=4",
                 module="launch.ray") as job:
        job.wait_for_file(checkpoints / "step_00000004.pt.sha256", timeout=400)
        workers = [p for p in psutil.Process(job.proc.pid).children(recursive=True)
                   if p.cmdline()[1:3] == ["-m", "train"]]
        assert len(workers) == 2, [p.cmdline() for p in workers]
        workers[-1].send_signal(signal.SIGKILL)
        assert job.finish(timeout=600) == 0, job.output()[-3000:]
    assert "resumed from" in job.out()
    assert equal(model(tmp_path / "run"), model(torchrun_run))
