"""Worker functions for tests/test_allreduce.py (run in real gloo processes)."""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist
from torch import nn

from train import allreduce

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64]
SHAPES = [(0,), (1,), (5,), (7, 3), (2, 3, 5), (1000,), (4097,)]


def _values(shape, dtype, rank: int, seed: int) -> torch.Tensor:
    """Small integers (exact in every dtype, also when summed), different on every rank."""
    gen = torch.Generator().manual_seed(seed * 100 + rank)
    return torch.randint(-8, 9, shape, generator=gen).to(dtype)


def compare_with_all_reduce() -> dict:
    """Both algorithms on every dtype and shape, against dist.all_reduce; also broadcast."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mismatches, checked = [], 0
    try:
        for algorithm, fn in allreduce.ALGORITHMS.items():
            for dtype in DTYPES:
                for seed, shape in enumerate(SHAPES):
                    mine = _values(shape, dtype, rank, seed)
                    reference = mine.clone()
                    fn(mine)
                    dist.all_reduce(reference)
                    checked += 1
                    if not torch.equal(mine, reference):
                        mismatches.append((algorithm, str(dtype), shape))
            # Random floats: sums in another order, so close rather than equal.
            mine = torch.randn(3001, generator=torch.Generator().manual_seed(rank))
            reference = mine.clone()
            fn(mine)
            dist.all_reduce(reference)
            if not torch.allclose(mine, reference, rtol=1e-5, atol=1e-5):
                mismatches.append((algorithm, "randn", (3001,)))
            # A non-contiguous tensor is reduced in place too.
            base = _values((6, 4), torch.float32, rank, 99)
            view, reference = base.t(), base.t().clone()
            fn(view)
            dist.all_reduce(reference)
            if not torch.equal(base.t(), reference):
                mismatches.append((algorithm, "transposed", (4, 6)))
        for shape in SHAPES:
            for src in range(dist.get_world_size()):
                mine = _values(shape, torch.float32, rank, 7)
                expected = _values(shape, torch.float32, src, 7)
                allreduce.broadcast(mine, src=src)
                if not torch.equal(mine, expected):
                    mismatches.append(("broadcast", src, shape))
        return {"mismatches": mismatches, "checked": checked}
    finally:
        gc.collect()
        dist.destroy_process_group()


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.fc1 = nn.Linear(45, 17)
        self.fc2 = nn.Linear(17, 3)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def gradient_sync(algorithm: str, bucket_mb: float | None) -> dict:
    """Every rank has different gradients; after sync all hold the mean, in the same tensors."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        torch.manual_seed(0)
        model = Small()
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(rank + 1))
        model.fc2.bias.grad = None if rank == 1 else model.fc2.bias.grad  # missing on one rank
        expected = []
        for p in params:
            local = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(local)
            expected.append(local / world)
        before = [id(p.grad) for p in params]
        sync = allreduce.GradientSync(model.parameters(), algorithm, bucket_mb)
        sync.sync()
        same_objects = [id(p.grad) for p in params if p is not model.fc2.bias] == [
            i for p, i in zip(params, before, strict=True) if p is not model.fc2.bias]
        errors = [float((p.grad - e).abs().max()) for p, e in zip(params, expected, strict=True)]
        return {"max_error": max(errors), "same_grad_tensors": same_objects,
                "bucket_sizes": sync.bucket_sizes, "frozen_grad": model.frozen.weight.grad}
    finally:
        gc.collect()
        dist.destroy_process_group()
