"""Our point-to-point allreduce against torch's own collectives, in real gloo processes."""


import pytest
import torch

from tests.allreduce_workers import BUCKET_MB, RING_NUMEL, check_all
from tests.helpers import run_distributed
from train.strategies.allreduce import ALGORITHMS

pytestmark = pytest.mark.slow

# Parameters of tests.allreduce_workers.Small in reverse registration order: fc2.bias,
# fc2.weight, fc1.bias, fc1.weight, conv.bias, conv.weight (float32, 4 bytes each).
BUCKET_SIZES = {
    None: [3, 51, 17, 765, 5, 135],  # one per parameter
    0.0001: [3, 51, 17, 765, 5, 135],  # 104 bytes: every parameter alone
    0.001: [71, 765, 140],  # 1048 bytes: 3+51+17 together, fc1.weight alone (too big), 5+135
    25.0: [976],  # all in one
}


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda n: f"{n}ranks")
def ranks(request) -> list[dict]:
    """What every rank of one process group found (one spawn per world size: seconds each)."""
    return run_distributed(check_all, request.param)


def test_both_algorithms_equal_all_reduce_for_every_dtype_and_shape(ranks):
    for found in ranks:
        assert found["allreduce"] == []


def test_batches_answered_with_one_work_as_nccl_does_give_the_same_results(ranks):
    # NCCL's batch_isend_irecv returns ONE Work for a whole batch; gloo one per message.
    for found in ranks:
        assert found["coalesced"] == []


def test_broadcast_from_every_rank(ranks):
    for found in ranks:
        assert found["broadcast"] == []


def test_subgroups_use_group_ranks(ranks):
    for found in ranks:
        assert found["group"] == []


def test_ring_sends_2_n_minus_1_over_n_of_the_data(ranks):
    n = len(ranks)
    assert [found["ring_sent"] for found in ranks] == [2 * (n - 1) * RING_NUMEL // n] * n


@pytest.mark.parametrize("bucket_mb", BUCKET_MB)
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_gradient_sync_averages_into_the_same_tensors(ranks, algorithm, bucket_mb):
    results = [found["gradient_sync"][algorithm, bucket_mb] for found in ranks]
    for result in results:
        assert result["max_error"] < 1e-6  # against dist.all_reduce / world size
        assert result["same_grad_objects"]  # copied into, never rebound (d2l #955)
        assert result["buffers_reused"]
        assert result["bucket_sizes"] == BUCKET_SIZES[bucket_mb]
        assert result["frozen_grad_is_none"]  # parameters without requires_grad are left out
    # The replicas must not drift: every rank holds bit-identical gradients.
    for result in results[1:]:
        for mine, first in zip(result["grads"], results[0]["grads"], strict=True):
            assert torch.equal(mine, first)


# Bucketing, bad settings, split_batch and the module's primitives, in one process:
# tests/unit/test_allreduce_logic.py.
