"""The paths (ddp, scratch, dp, fsdp, ddp with ZeRO) are the same optimization: parity, sync
checks, input."""

import pytest
import torch

from tests.helpers import PARITY_RUN as SMALL
from tests.helpers import REPO, run_cli, run_distributed, run_single, run_workers, small_run
from tests.workers import train_and_return_params

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "default.yaml")


@pytest.fixture
def reference(one_process_reference):
    """One process, no synchronization at all (tests/conftest.py: shared with
    test_distributed.py)."""
    return one_process_reference


# LeNet's gradients are 129,068 floats (504 KiB): 0.1 MiB buckets cut parameters unevenly.
# `compat`: one of each mode in the torch-2.11 tier too (`make test-torch211`).
@pytest.mark.parametrize("world_size, path", [
    pytest.param(2, ["mode=ddp"], marks=pytest.mark.compat),
    (3, ["mode=ddp"]),
    pytest.param(2, ["mode=scratch", "scratch.algorithm=naive", "scratch.bucket_mb=0.1"],
                 marks=pytest.mark.compat),
    (3, ["mode=scratch", "scratch.algorithm=naive", "scratch.per_parameter=true"]),
    (2, ["mode=scratch", "scratch.algorithm=ring", "scratch.per_parameter=true"]),
    (3, ["mode=scratch", "scratch.algorithm=ring", "scratch.bucket_mb=0.1"]),
    # Sharded: FSDP2 (uneven shards over 3 ranks; micro-batches accumulated unreduced), ZeRO.
    pytest.param(2, ["mode=fsdp"], marks=pytest.mark.compat),
    (3, ["mode=fsdp", "train.grad_accum_steps=2"]),
    pytest.param(3, ["mode=ddp", "ddp.zero=true"], marks=pytest.mark.compat),
])
def test_every_path_matches_one_process(tmp_path, reference, world_size, path):
    params = run_distributed(train_and_return_params, world_size,
                             [*SMALL, *path, f"run.dir={tmp_path}"])[0]
    for name, value in reference.items():
        torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.compat
def test_dataparallel_matches_one_process(tmp_path, reference):
    params = run_single(train_and_return_params, [*SMALL, "mode=dp", f"run.dir={tmp_path}"])
    for name, value in reference.items():
        torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["ddp", "scratch"])
def test_the_sync_checker_catches_a_planted_desync(tmp_path, mode):
    result = run_cli("launch", "--cpu", "--mode", mode, CONFIG,
                     *small_run(tmp_path, "check.sync_every_steps=2", "debug.desync_rank=1",
                                "debug.desync_step=3"))
    assert result.returncode == 3, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "replicas diverged by step 4: rank 1's parameters differ from rank 0's" in errors[0]


def test_dp_launches_one_process_and_says_cpu_has_nothing_to_split(tmp_path):
    result = run_cli("launch", "--mode", "dp", CONFIG, *small_run(tmp_path, "train.max_steps=3"))
    assert result.returncode == 0, result.stderr
    assert "DataParallel has nothing to split there" in result.stdout
    assert "DataParallel on the CPU" in result.stdout


# The paths' bad input, refused by the launcher: tests/unit/test_bad_input.py.


def test_dp_in_several_workers_is_refused_once(tmp_path):
    """Two workers with torchrun's variables (run_workers) and mode dp: one line, exit 2."""
    result = run_workers(2, CONFIG, *small_run(tmp_path), "mode=dp")
    assert result.returncode == 2
    reported = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(reported) == 1 and "mode dp runs ONE process" in reported[0], result.stderr
