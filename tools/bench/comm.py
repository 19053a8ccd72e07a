"""Communication benchmarks, run inside real worker processes (gloo on the CPU, NCCL on GPUs).

- allreduce: time, algorithm and bus bandwidth (nccl-tests definitions) of `dist.all_reduce`,
  our ring and our naive allreduce, from 4 KiB to 64 MiB;
- copy bandwidth of this machine, for the ring's lower bound 2(n-1)/n * S / B;
- ResNet-18's gradients synced one tensor at a time versus in buckets;
- DDP on ResNet-18: a bucket-size sweep, and how much sync it hides behind backward.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from common.collectives import time_collective
from common.spawn import spawn as run_processes
from models import build_model
from train.strategies import allreduce

SIZES = [4 * 2**10 * 4**i for i in range(8)]  # 4 KiB ... 64 MiB


def spawn(fn: Callable[[], dict], world_size: int, timeout: float = 600) -> dict:
    """Run `fn` in `world_size` fresh processes with torchrun's variables; rank 0's result."""
    return run_processes(fn, world_size, timeout=timeout)[0]


def _setup() -> tuple[int, int, torch.device]:
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ["WORLD_SIZE"])
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    return rank, dist.get_world_size(), device


def _teardown() -> None:
    gc.collect()
    dist.destroy_process_group()


def copy_bandwidth(device: torch.device, nbytes: int = 64 * 2**20) -> float:
    """Bytes per second of one large tensor copy on this device (read + write counted once)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times)


def allreduce_sweep() -> dict:
    rank, world, device = _setup()
    try:
        rows = []
        for size in SIZES:
            tensor = torch.ones(size // 4, device=device)
            repeats = 20 if size <= 2**20 else 5
            row = {"bytes": size}
            for name, fn in (("torch", lambda t=tensor: dist.all_reduce(t)),
                             ("ring", lambda t=tensor: allreduce.allreduce_ring(t)),
                             ("naive", lambda t=tensor: allreduce.allreduce_naive(t))):
                seconds = time_collective(fn, device, repeats)
                algbw = size / seconds
                row[name] = {"seconds": seconds, "algbw_GBps": algbw / 1e9,
                             "busbw_GBps": algbw * 2 * (world - 1) / world / 1e9}
            rows.append(row)
        return {"world_size": world, "device": device.type, "rows": rows,
                "copy_bandwidth_GBps": copy_bandwidth(device) / 1e9}
    finally:
        _teardown()


def _resnet(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", 1, 10, 28).to(device)


def resnet_gradient_sync() -> dict:
    """ResNet-18's gradients (62 tensors, 45 MB) one allreduce per tensor versus bucketed."""
    rank, world, device = _setup()
    try:
        model = _resnet(device)
        for p in model.parameters():
            p.grad = torch.full_like(p, float(rank + 1))
        params = list(model.parameters())
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        per_parameter = allreduce.GradientSync(params, "ring", None)
        bucketed = allreduce.GradientSync(params, "ring", 25.0)
        result = {
            "tensors": len(params), "bytes": flat.numel() * 4,
            "torch_per_parameter": time_collective(
                lambda: [dist.all_reduce(p.grad) for p in params], device, 3),
            "torch_flat": time_collective(lambda: dist.all_reduce(flat), device, 3),
            "ring_per_parameter": time_collective(per_parameter.sync, device, 3),
            "ring_bucketed_25mb": time_collective(bucketed.sync, device, 3),
            "buckets_25mb": len(bucketed.buckets),
        }
        return result
    finally:
        _teardown()


def ddp_buckets_and_overlap(batch: int = 8) -> dict:
    """DDP on ResNet-18: step time per bucket size, and the sync it hides behind backward."""
    rank, world, device = _setup()
    try:
        gen = torch.Generator().manual_seed(rank)
        images = torch.randn(batch, 1, 28, 28, generator=gen).to(device)
        labels = torch.randint(10, (batch,), generator=gen).to(device)
        sweep = {}
        for cap in (1, 5, 25, 100):
            model = DistributedDataParallel(_resnet(device), bucket_cap_mb=cap,
                                            device_ids=[rank] if device.type == "cuda" else None)
            step = _forward_backward(model, images, labels)
            for _ in range(2):
                step()  # DDP rebuilds its buckets after the first iteration
            sweep[cap] = time_collective(step, device, 3)
            del model
        model = DistributedDataParallel(_resnet(device), bucket_cap_mb=25,
                                        device_ids=[rank] if device.type == "cuda" else None)
        step = _forward_backward(model, images, labels)
        with_sync = time_collective(step, device, 3)
        with model.no_sync():
            compute_only = time_collective(step, device, 3)
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        sync_only = time_collective(lambda: dist.all_reduce(flat), device, 3)
        hidden = max(0.0, compute_only + sync_only - with_sync)
        return {"batch_per_worker": batch, "bucket_sweep_s": sweep, "step_s": with_sync,
                "compute_only_s": compute_only, "sync_only_s": sync_only,
                "hidden_sync_s": hidden, "hidden_fraction": min(1.0, hidden / sync_only)}
    finally:
        _teardown()


def _forward_backward(model, images, labels) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
    return step
