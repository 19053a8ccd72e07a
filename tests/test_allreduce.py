"""Our point-to-point allreduce against torch's, in real gloo processes."""

import ast
from pathlib import Path

import pytest
import torch

from tests.allreduce_workers import SHAPES, compare_with_all_reduce, gradient_sync
from tests.helpers import run_distributed
from train.allreduce import GradientSync, split_batch

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_naive_ring_and_broadcast_equal_torch_for_every_dtype_and_shape(world_size):
    results = run_distributed(compare_with_all_reduce, world_size)
    for result in results:
        assert result["mismatches"] == []
        assert result["checked"] == 2 * 6 * len(SHAPES)


# Per parameter (the book's way), buckets smaller than a parameter (each tensor alone) and
# buckets that pack several parameters unevenly.
@pytest.mark.parametrize("algorithm", ["naive", "ring"])
@pytest.mark.parametrize("bucket_mb, sizes", [
    (None, [3, 51, 17, 765, 5, 135]),
    (0.0001, [3, 51, 17, 765, 5, 135]),
    (0.0003, [71, 765, 5, 135]),
    (25.0, [976]),
])
def test_gradient_sync_averages_into_the_same_tensors(algorithm, bucket_mb, sizes):
    for result in run_distributed(gradient_sync, 3, algorithm, bucket_mb):
        assert result["max_error"] < 1e-6
        assert result["same_grad_tensors"]
        assert result["bucket_sizes"] == sizes
        assert result["frozen_grad"] is None  # parameters without requires_grad are left out


def test_gradient_sync_rejects_bad_settings():
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="unknown allreduce algorithm 'tree'"):
        GradientSync(params, "tree", 1.0)
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="bucket_mb must be positive"):
            GradientSync(params, "ring", bad)


def test_split_batch_cuts_into_near_equal_micro_batches():
    images, labels = torch.arange(10 * 2).view(10, 2), torch.arange(10)
    parts = split_batch(images, labels, 3)
    assert [len(y) for _, y in parts] == [4, 3, 3]
    assert torch.equal(torch.cat([x for x, _ in parts]), images)
    assert torch.equal(torch.cat([y for _, y in parts]), labels)
    for bad in (0, 11):
        with pytest.raises(ValueError):
            split_batch(images, labels, bad)


def test_the_module_uses_point_to_point_primitives_only():
    tree = ast.parse(Path("train/allreduce.py").read_text())
    called = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
              and isinstance(node.value, ast.Name) and node.value.id == "dist"}
    collectives = {"all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce",
                   "gather", "scatter", "all_to_all", "reduce_scatter_tensor",
                   "all_gather_into_tensor", "barrier"}
    assert called & collectives == set()
    assert {"send", "recv", "isend", "irecv"} <= called
