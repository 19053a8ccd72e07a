"""Worker functions for tests/test_allreduce.py, run in real gloo processes.

Spawning a process group costs seconds here, so one worker checks everything for its world
size and returns what it found; torch's own collectives are the reference.
"""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist
from torch import nn

from train.strategies import allreduce

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64]
# Empty, 0-dim, fewer elements than ranks, not divisible by 2, 3 or 4, several dimensions.
SHAPES = [(0,), (0, 4), (), (1,), (2,), (5,), (7, 3), (2, 3, 5), (1000,), (4097,)]
BUCKET_MB = [None, 0.0001, 0.001, 25.0]  # per parameter, tiny, medium, one bucket
RING_NUMEL = 120  # divisible by 2, 3 and 4: the ring's traffic is exactly 2(n-1)/n of it


def _values(shape, dtype, rank: int, seed: int) -> torch.Tensor:
    """Small integers, different on every rank: exact in every dtype, also when summed."""
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    return torch.randint(-8, 9, shape, generator=gen).to(dtype)


def check_all() -> dict:
    """Everything for this world size: {check: findings}, the same keys on every rank."""
    dist.init_process_group("gloo")
    try:
        return {"allreduce": _allreduce_mismatches(), "broadcast": _broadcast_mismatches(),
                "coalesced": _coalesced_mismatches(),
                "group": _group_mismatches(), "ring_sent": _ring_elements_sent(RING_NUMEL),
                "gradient_sync": {(name, mb): _gradient_sync(name, mb)
                                  for name in allreduce.ALGORITHMS for mb in BUCKET_MB}}
    finally:
        gc.collect()
        dist.destroy_process_group()


def _allreduce_mismatches() -> list[tuple]:
    """Both algorithms against dist.all_reduce: every dtype and shape, exactly; once with the
    ring's chunks in one segment each, once cut into many uneven segments."""
    mismatches = []
    for segment in (allreduce.SEGMENT, 7):
        default, allreduce.SEGMENT = allreduce.SEGMENT, segment
        try:
            mismatches += [(f"segment {segment}", *m) for m in _mismatches()]
        finally:
            allreduce.SEGMENT = default
    return mismatches


def _mismatches(dtypes: list[torch.dtype] = DTYPES) -> list[tuple]:
    rank, mismatches = dist.get_rank(), []
    for name, fn in allreduce.ALGORITHMS.items():
        for dtype in dtypes:
            for seed, shape in enumerate(SHAPES):
                mine = _values(shape, dtype, rank, seed)
                reference = mine.clone()
                fn(mine)
                dist.all_reduce(reference)
                if not (mine.shape == reference.shape and torch.equal(mine, reference)):
                    mismatches.append((name, str(dtype), shape))
        # Random floats are summed in another order than gloo's: close, not equal.
        for dtype in (torch.float32, torch.float64):
            mine = torch.randn(3001, generator=torch.Generator().manual_seed(rank), dtype=dtype)
            reference = mine.clone()
            fn(mine)
            dist.all_reduce(reference)
            if not torch.allclose(mine, reference, rtol=1e-6, atol=1e-6):
                mismatches.append((name, "randn", str(dtype)))
        # Tensors that are not contiguous are reduced in place too.
        for base in (_values((6, 4), torch.float32, rank, 99).t(),
                     _values((2, 3, 5, 4), torch.float32, rank, 98).to(
                         memory_format=torch.channels_last)):
            mine, reference = base, base.clone()
            fn(mine)
            dist.all_reduce(reference)
            if not torch.equal(base, reference):
                mismatches.append((name, "not contiguous", tuple(base.stride())))
    return mismatches


class _OneWork:
    """What NCCL's `batch_isend_irecv` returns for a batch: one Work, done when all of it is."""

    def __init__(self, works: list):
        self.works = works

    def wait(self) -> bool:
        for work in self.works:
            work.wait()
        return True


def _coalesced_mismatches() -> list[tuple]:
    """Both algorithms and broadcast with `batch_isend_irecv` answering as it does on NCCL,
    with the ring's chunks in many uneven segments (several receives per batch). Two dtypes:
    how the Works come back does not depend on what they carry."""
    real, default = dist.batch_isend_irecv, allreduce.SEGMENT
    dist.batch_isend_irecv = lambda ops: [_OneWork(real(ops))]
    allreduce.SEGMENT = 7
    try:
        return _mismatches([torch.float32, torch.int64]) + _broadcast_mismatches()
    finally:
        dist.batch_isend_irecv, allreduce.SEGMENT = real, default


def _broadcast_mismatches() -> list[tuple]:
    """Every rank as the source, every dtype and shape: each rank ends with src's values."""
    rank, mismatches = dist.get_rank(), []
    for src in range(dist.get_world_size()):
        for dtype in DTYPES:
            for seed, shape in enumerate(SHAPES):
                mine = _values(shape, dtype, rank, seed)
                allreduce.broadcast(mine, src=src)
                if not torch.equal(mine, _values(shape, dtype, src, seed)):
                    mismatches.append((src, str(dtype), shape))
    mine = _values((4, 6), torch.float64, rank, 7).t()
    allreduce.broadcast(mine, src=0)
    if not torch.equal(mine, _values((4, 6), torch.float64, 0, 7).t()):
        mismatches.append((0, "not contiguous", (6, 4)))
    return mismatches


def _group_mismatches() -> list[tuple]:
    """In a group of ranks 1..n-1 (group ranks differ from global ones; a lone rank at n=2)."""
    group = dist.new_group(list(range(1, dist.get_world_size())))  # every rank must call it
    rank, mismatches = dist.get_rank(), []
    if rank == 0:
        return mismatches
    for name, fn in allreduce.ALGORITHMS.items():
        for seed, shape in enumerate(SHAPES):
            mine = _values(shape, torch.int64, rank, seed)
            reference = mine.clone()
            fn(mine, group=group)
            dist.all_reduce(reference, group=group)
            if not torch.equal(mine, reference):
                mismatches.append((name, shape))
    for src in range(dist.get_world_size(group)):
        mine = _values((7, 3), torch.float32, rank, 5)
        allreduce.broadcast(mine, src=src, group=group)
        if not torch.equal(mine, _values((7, 3), torch.float32, src + 1, 5)):
            mismatches.append(("broadcast", src))
    return mismatches


def _ring_elements_sent(numel: int) -> int:
    """Elements this rank sends during one ring allreduce of `numel` elements."""
    sent, real = [], dist.P2POp

    def counting(op, tensor, *args, **kwargs):
        if op is dist.isend:
            sent.append(tensor.numel())
        return real(op, tensor, *args, **kwargs)

    dist.P2POp = counting
    try:
        allreduce.allreduce_ring(torch.ones(numel))
    finally:
        dist.P2POp = real
    return sum(sent)


class Small(nn.Module):
    """Parameters of 135, 5, 765, 17, 51 and 3 elements, and a frozen layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.fc1 = nn.Linear(45, 17)
        self.fc2 = nn.Linear(17, 3)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def _gradient_sync(algorithm: str, bucket_mb: float | None) -> dict:
    """Two steps with different gradients on every rank, one missing on some rank each step."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = Small()
    params = [p for p in model.parameters() if p.requires_grad]
    sync = allreduce.GradientSync(model.parameters(), algorithm, bucket_mb)
    buffers = [buffer.data_ptr() for buffer, _ in sync.buckets]
    errors, same_objects = [], True
    for step, missing in enumerate([model.fc2.bias, model.conv.bias]):
        gen = torch.Generator().manual_seed(100 * step + rank)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        missing.grad = None if rank == step else missing.grad
        expected = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        for tensor in expected:
            dist.all_reduce(tensor)
        before = {p: p.grad for p in params if p.grad is not None}
        sync.sync()
        same_objects &= all(p.grad is grad for p, grad in before.items())
        errors += [float((p.grad - e / world).abs().max()) for p, e in zip(params, expected,
                                                                           strict=True)]
    return {"max_error": max(errors), "same_grad_objects": same_objects,
            "grads": [p.grad for p in params], "bucket_sizes": sync.bucket_sizes,
            "buffers_reused": buffers == [buffer.data_ptr() for buffer, _ in sync.buckets],
            "frozen_grad_is_none": model.frozen.weight.grad is None}
