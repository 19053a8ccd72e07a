"""The hand-written allreduce's pure logic, in one process: its buckets, its bad settings, the
micro-batch split, and that it uses point-to-point primitives only. (Against torch's own
collectives in real gloo processes: tests/test_allreduce.py.)"""

import ast

import pytest
import torch

from tests.helpers import REPO
from train.data.batches import split_batch
from train.strategies.allreduce import GradientSync


def test_buckets_keep_dtypes_apart_and_give_a_large_parameter_its_own():
    p32 = [torch.nn.Parameter(torch.zeros(n)) for n in (10, 300, 20)]
    p64 = [torch.nn.Parameter(torch.zeros(n, dtype=torch.float64)) for n in (4, 6)]
    params = [p32[0], p64[0], p32[1], p64[1], p32[2]]  # registration order
    sync = GradientSync(params, "ring", 1000 / 2**20)  # 1000 bytes: 250 float32, 125 float64
    # Reversed: 20 opens a float32 bucket, 6 a float64 one; 300 (1200 bytes) gets its own;
    # 4 joins the 6; 10 cannot join the 300 and opens a fourth.
    assert sync.bucket_sizes == [20, 10, 300, 10]
    assert [buffer.dtype for buffer, _ in sync.buckets] == [torch.float32, torch.float64,
                                                             torch.float32, torch.float32]
    assert GradientSync(params, "naive", None).bucket_sizes == [20, 6, 300, 4, 10]
    assert GradientSync(params, "naive", 1.0).bucket_sizes == [330, 10]


def test_gradient_sync_without_a_process_group_leaves_gradients_alone():
    layer = torch.nn.Linear(3, 2)
    layer.weight.grad, layer.bias.grad = torch.ones(2, 3), None
    grad = layer.weight.grad
    GradientSync(layer.parameters(), "ring", 1.0).sync()
    assert layer.weight.grad is grad and torch.equal(grad, torch.ones(2, 3))
    assert layer.bias.grad is None


def test_gradient_sync_rejects_bad_settings():
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="unknown allreduce algorithm 'tree'"):
        GradientSync(params, "tree", 1.0)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="bucket_mb must be positive"):
            GradientSync(params, "ring", bad)


def test_split_batch_cuts_into_near_equal_micro_batches():
    images, labels = torch.arange(10 * 2).view(10, 2), torch.arange(10) * 7
    parts = split_batch(images, labels, 3)
    assert [(len(x), len(y)) for x, y in parts] == [(4, 4), (3, 3), (3, 3)]
    assert torch.equal(torch.cat([x for x, _ in parts]), images)
    assert torch.equal(torch.cat([y for _, y in parts]), labels)
    assert all(torch.equal(x[:, 0] // 2 * 7, y) for x, y in parts)  # pairs stay together
    assert [len(y) for _, y in split_batch(images, labels, 10)] == [1] * 10
    (whole_x, whole_y), = split_batch(images, labels, 1)
    assert torch.equal(whole_x, images) and torch.equal(whole_y, labels)
    for bad in (0, -1, 11):
        with pytest.raises(ValueError, match=f"into {bad} parts"):
            split_batch(images, labels, bad)
    with pytest.raises(ValueError, match="10 images but 9 labels"):
        split_batch(images, labels[:9], 2)


def test_the_module_uses_point_to_point_primitives_only():
    tree = ast.parse((REPO / "train/strategies/allreduce.py").read_text())
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "dist"}
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    collectives = {"all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce",
                   "gather", "scatter", "all_to_all", "reduce_scatter_tensor",
                   "all_gather_into_tensor", "all_to_all_single", "barrier",
                   "all_gather_object", "broadcast_object_list", "all_reduce_coalesced"}
    assert used & collectives == set()
    assert imported & collectives == set()
    assert {"isend", "irecv", "batch_isend_irecv"} <= used
    # Every message is batched alike on both sides (a lone NCCL send/recv may use another
    # communicator than a batched one): no plain send/recv.
    assert used & {"send", "recv"} == set()
