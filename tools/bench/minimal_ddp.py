"""The smallest honest DDP loop, for comparison: what a person writes from the PyTorch tutorial.

Same data (the synthetic set, in memory, uint8, each batch gathered by index then made float
and normalized with the training set's per-channel statistics), same model and init, same
global batch, same optimizer and learning-rate schedule (warmup, cosine), same DDP knobs
(gradient_as_bucket_view, as configs/default.yaml), same threads, denormal flushing and memory
format (NHWC on the CPU), started by torchrun with the launcher's monitor interval, epochs
timed from a barrier as `make train` times them; none of the project's loop, strategies or
bookkeeping.
Run with torchrun; prints one JSON line per epoch from rank 0.

    torchrun --nproc-per-node 2 -m tools.bench.minimal_ddp --epochs 3
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from common.schema import SyntheticConfig
from models import build_model
from train.config import load_config
from train.data import make_synthetic

CONFIG = load_config(Path(__file__).resolve().parents[2] / "configs" / "default.yaml")


def lenet() -> torch.nn.Module:
    """LeNet initialized as configs/default.yaml says (`make train` is what we compare)."""
    return build_model("lenet", 1, 10, 28, init=CONFIG.model.init)


def lr_at(step: int, total: int, warmup: int) -> float:
    """The default config's schedule: linear warmup, then cosine to 0 (a factor of lr)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256, help="global batch")
    parser.add_argument("--train-samples", type=int, default=24_000)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))
    torch.set_flush_denormal(True)

    data, _ = make_synthetic(SyntheticConfig(train_samples=args.train_samples, test_samples=1), 0)
    images, labels = data.images, data.labels  # uint8, as `make train` holds them
    as_float = images.float()
    mean, std = as_float.mean(dim=(0, 2, 3)), as_float.std(dim=(0, 2, 3))  # per channel
    mean, std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
    del as_float

    torch.manual_seed(0)
    model = DistributedDataParallel(lenet().to(memory_format=torch.channels_last),
                                    bucket_cap_mb=CONFIG.ddp.bucket_cap_mb,
                                    gradient_as_bucket_view=CONFIG.ddp.gradient_as_bucket_view)
    o = CONFIG.optim
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=o.momentum,
                          weight_decay=o.weight_decay)
    sampler = DistributedSampler(range(len(labels)), num_replicas=world, rank=rank, seed=0,
                                 drop_last=True)
    local = args.batch_size // world
    steps = len(sampler) // local
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_at(step, steps * args.epochs, o.warmup_steps))
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        dist.barrier()
        start = time.perf_counter()
        for i in range(steps):
            idx = order[i * local:(i + 1) * local]
            x = images[idx].float().sub_(mean).div_(std)
            x = x.contiguous(memory_format=torch.channels_last)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), labels[idx])
            loss.backward()
            opt.step()
            sched.step()
        seconds = time.perf_counter() - start
        if rank == 0:
            print(json.dumps({"epoch": epoch + 1, "epoch_time_s": seconds,
                              "samples_per_s": steps * args.batch_size / seconds}), flush=True)
    del model
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
