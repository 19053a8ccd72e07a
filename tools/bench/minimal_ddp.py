"""The smallest honest DDP loop, for comparison: what a person writes from the PyTorch tutorial.

Same data (the synthetic set, in memory, uint8, each batch gathered by index then made float
and normalized with the training set's per-channel statistics), same model and init, same
global batch, same optimizer and learning-rate schedule (warmup, cosine), same DDP knobs
(gradient_as_bucket_view, as configs/default.yaml), same threads, denormal flushing, malloc
limits (freed memory kept for the next step) and memory format (NHWC on the CPU), started by
torchrun with the launcher's monitor interval, epochs timed from a barrier as `make train`
times them; none of the project's loop, strategies or bookkeeping.
Run with torchrun; prints one JSON line per epoch from rank 0.

    torchrun --nproc-per-node 2 -m tools.bench.minimal_ddp --epochs 3
"""

import argparse
import json
import math
import os
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from common.host import keep_freed_memory
from common.run_length import warmup_in_steps
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


def page_faults() -> int:
    """This process's minor page faults so far (memory taken from the OS page by page)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class MinimalLoop:
    """The loop's state on this rank: data, model, optimizer, sampler, schedule."""

    def __init__(self, rank: int, world: int, batch_size: int, train_samples: int, lr: float,
                 epochs: int):
        data, _ = make_synthetic(SyntheticConfig(train_samples=train_samples, test_samples=1), 0)
        self.images, self.labels = data.images, data.labels  # uint8, as `make train` holds them
        as_float = self.images.float()
        mean, std = as_float.mean(dim=(0, 2, 3)), as_float.std(dim=(0, 2, 3))  # per channel
        self.mean, self.std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
        del as_float

        torch.manual_seed(0)
        self.model = DistributedDataParallel(
            lenet().to(memory_format=torch.channels_last), bucket_cap_mb=CONFIG.ddp.bucket_cap_mb,
            gradient_as_bucket_view=CONFIG.ddp.gradient_as_bucket_view)
        o = CONFIG.optim
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=o.momentum,
                                   weight_decay=o.weight_decay)
        self.sampler = DistributedSampler(range(len(self.labels)), num_replicas=world, rank=rank,
                                          seed=0, drop_last=True)
        self.local = batch_size // world
        self.steps = len(self.sampler) // self.local
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda step: lr_at(step, self.steps * epochs, warmup_in_steps(o, self.steps)))

    def epoch(self, epoch: int) -> float:
        """One epoch's steps; its seconds, timed from a barrier as `make train` times them."""
        self.sampler.set_epoch(epoch)
        order = torch.tensor(list(self.sampler))
        dist.barrier()
        start = time.perf_counter()
        for i in range(self.steps):
            idx = order[i * self.local:(i + 1) * self.local]
            x = self.images[idx].float().sub_(self.mean).div_(self.std)
            x = x.contiguous(memory_format=torch.channels_last)
            self.opt.zero_grad()
            loss = F.cross_entropy(self.model(x), self.labels[idx])
            loss.backward()
            self.opt.step()
            self.sched.step()
        return time.perf_counter() - start


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
    keep_freed_memory(CONFIG.dist.cpu_malloc_keep_mb)  # else every step page-faults its memory

    loop = MinimalLoop(rank, world, args.batch_size, args.train_samples, args.lr, args.epochs)
    for epoch in range(args.epochs):
        faults = page_faults()
        seconds = loop.epoch(epoch)
        faults = page_faults() - faults
        if rank == 0:
            print(json.dumps({"epoch": epoch + 1, "epoch_time_s": seconds,
                              "samples_per_s": loop.steps * args.batch_size / seconds,
                              "page_faults_per_step": faults / loop.steps}), flush=True)
    del loop
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
