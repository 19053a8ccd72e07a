"""GPU twins of the core CPU tests: the same runs on CUDA workers with nccl.

Each is skipped without enough GPUs, with a reason that names its CPU twin. The test process
itself sees no GPU (conftest.py): every run happens in a subprocess that `gpu_env()` gives the
machine's GPUs back to, and tensors come back on the CPU.
"""

import json
import math

import pytest
import torch

from tests.helpers import (
    REPO,
    gpu_count,
    gpu_env,
    run_cli,
    run_distributed,
    run_single,
    small_run,
)
from tests.test_paths import SMALL
from tests.workers import train_and_return_params

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
CONFIG = str(REPO / "configs" / "default.yaml")
# The CPU twins' parity runs, on CUDA. Without benchmark mode cuDNN picks its algorithms by
# heuristics, the same on every run; benchmark mode times candidates and may differ per run.
ON_GPU = [*SMALL, "dist.device=cuda", "perf.cudnn_benchmark=false"]
# Looser than the CPU twins' rtol 1e-5, atol 1e-6: cuDNN's algorithms (Winograd, split
# reductions with atomics) differ per batch-shard shape and round differently. A missed or
# doubled gradient sync is off by orders of magnitude more.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def needs_gpus(count: int, twin: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(gpu_count() < count,
                              reason=f"needs {count} GPU(s) (CPU twin: {twin})")


def fp32_gpu_env(gpus: int | None = None) -> dict[str, str | None]:
    """`gpu_env` with TF32 off.

    train/ never sets torch.backends.cudnn.allow_tf32, and PyTorch's default lets cuDNN run
    fp32 convolutions in TF32 (10-bit mantissa) on Ampere and newer: runs with different batch
    shards would differ by ~1e-3 relative, not by summation order. cuDNN and cuBLAS read this
    variable when they start, whatever torch's flags say.
    """
    return {**gpu_env(gpus), "NVIDIA_TF32_OVERRIDE": "0"}


def assert_params_close(actual: dict[str, torch.Tensor],
                        expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, **TOLERANCE)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """One process on one GPU, no synchronization at all."""
    return run_single(train_and_return_params,
                      [*ON_GPU, f"run.dir={tmp_path_factory.mktemp('reference')}"],
                      env=fp32_gpu_env())


@needs_gpus(1, "test_cli.py::test_launch_trains_with_two_cpu_workers_and_leaves_a_run_folder")
def test_launch_trains_on_one_gpu_with_nccl(tmp_path):
    result = run_cli("launch", "--gpus", "1", CONFIG, *small_run(tmp_path, "train.max_steps=4"),
                     env=gpu_env())
    assert result.returncode == 0, result.stderr
    assert "1 GPU worker(s) with nccl" in result.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["backend"], summary["device"]) == ("nccl", "cuda")
    assert (summary["world_size"], summary["mode"], summary["steps"]) == (1, "ddp", 4)
    assert math.isfinite(summary["final_train_loss"])


@needs_gpus(1, "test_doctor.py::test_default_config_is_ready_to_launch")
def test_doctor_sees_the_gpu_and_is_ready(tmp_path):
    result = run_cli("launch.doctor", "--gpus", "1", CONFIG, f"run.dir={tmp_path / 'run'}",
                     env=gpu_env(), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("doctor: mode ddp, 1 worker(s) x 1 node(s) = 1 in all, cuda (nccl)")
    assert "1 GPU worker(s) with nccl" in result.stdout
    assert lines[-1].startswith("doctor: ready to launch")  # warnings allowed, no FAIL


@needs_gpus(1, "test_paths.py::test_every_path_matches_one_process (mode=ddp)")
def test_ddp_on_gpus_matches_one_process(tmp_path, reference):
    workers = min(2, gpu_count())  # one worker still goes through DDP and nccl
    params = run_distributed(train_and_return_params, workers,
                             [*ON_GPU, "mode=ddp", f"run.dir={tmp_path}"], env=fp32_gpu_env())[0]
    assert_params_close(params, reference)


@needs_gpus(2, "test_paths.py::test_every_path_matches_one_process (mode=scratch)")
@pytest.mark.parametrize("path", [
    ["scratch.algorithm=ring", "scratch.bucket_mb=0.1"],
    ["scratch.algorithm=ring", "scratch.per_parameter=true"],
    ["scratch.algorithm=naive", "scratch.bucket_mb=0.1"],
])
def test_scratch_allreduce_on_two_gpus_matches_one_process(tmp_path, reference, path):
    params = run_distributed(train_and_return_params, 2,
                             [*ON_GPU, "mode=scratch", *path, f"run.dir={tmp_path}"],
                             env=fp32_gpu_env())[0]
    assert_params_close(params, reference)


@needs_gpus(1, "test_paths.py::test_every_path_matches_one_process (2 workers)")
@pytest.mark.parametrize("path", [
    ["mode=scratch", "scratch.algorithm=ring", "scratch.bucket_mb=0.1"],
    ["mode=scratch", "scratch.algorithm=naive", "scratch.per_parameter=true"],
    ["mode=ddp"],
])
def test_two_gloo_workers_sharing_one_gpu_match_one_process(tmp_path, reference, path):
    # gloo's send/recv read host memory: our allreduce stages CUDA tensors through it.
    params = run_distributed(train_and_return_params, 2,
                             [*ON_GPU, "dist.backend=gloo", *path, f"run.dir={tmp_path}"],
                             env=fp32_gpu_env(1))[0]
    assert_params_close(params, reference)


@needs_gpus(2, "test_paths.py::test_dataparallel_matches_one_process")
def test_dataparallel_over_two_gpus_matches_one_process(tmp_path, reference):
    # DataParallel takes every GPU it sees: show it exactly two, as `launch --gpus 2` does.
    params = run_single(train_and_return_params, [*ON_GPU, "mode=dp", f"run.dir={tmp_path}"],
                        env=fp32_gpu_env(2))
    assert_params_close(params, reference)


@needs_gpus(2, "test_paths.py::test_dp_launches_one_process_and_says_cpu_has_nothing_to_split")
def test_dp_launch_drives_as_many_gpus_as_asked(tmp_path):
    result = run_cli("launch", "--mode", "dp", "--gpus", "2", CONFIG,
                     *small_run(tmp_path, "train.max_steps=3"), env=gpu_env())
    assert result.returncode == 0, result.stderr
    assert "DataParallel over 2 GPU(s) in one process" in result.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["mode"], summary["device"], summary["world_size"]) == ("dp", "cuda", 1)


@needs_gpus(1, "test_knobs.py::test_bf16_autocast_on_the_cpu_trains_close_to_fp32")
def test_bf16_autocast_on_one_gpu_trains(tmp_path):
    result = run_cli("launch", "--gpus", "1", CONFIG,
                     *small_run(tmp_path, "train.max_steps=4", "perf.precision=bf16"),
                     env=gpu_env())
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["device"] == "cuda" and summary["steps"] == 4
    assert math.isfinite(summary["final_train_loss"])
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", map_location="cpu",
                       weights_only=True)["model"]
    assert all(v.dtype == torch.float32 for v in saved.values())  # autocast: weights stay fp32
    assert all(torch.isfinite(v).all() for v in saved.values())
