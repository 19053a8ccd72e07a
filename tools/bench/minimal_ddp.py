"""The smallest honest DDP loop, for comparison: what a person writes from the PyTorch tutorial.

Same data (the synthetic set, in memory), same model, same global batch, same threads,
denormal flushing and memory format (NHWC on the CPU) as `make train`; none of the project's
loop, strategies or bookkeeping.
Run with torchrun; prints one JSON line per epoch from rank 0.

    torchrun --nproc-per-node 2 -m tools.bench.minimal_ddp --epochs 3
"""

import argparse
import json
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


def lenet() -> torch.nn.Module:
    """LeNet initialized as configs/default.yaml says (`make train` is what we compare)."""
    init = load_config(Path(__file__).resolve().parents[2] / "configs" / "default.yaml").model.init
    return build_model("lenet", 1, 10, 28, init=init)


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
    images = data.images.float().div_(255)
    images = (images - images.mean()) / images.std()
    images = images.contiguous(memory_format=torch.channels_last)
    labels = data.labels

    torch.manual_seed(0)
    model = DistributedDataParallel(lenet().to(memory_format=torch.channels_last))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    sampler = DistributedSampler(range(len(labels)), num_replicas=world, rank=rank, seed=0,
                                 drop_last=True)
    local = args.batch_size // world
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        start = time.perf_counter()
        steps = len(order) // local
        for i in range(steps):
            idx = order[i * local:(i + 1) * local]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        dist.barrier()
        seconds = time.perf_counter() - start
        if rank == 0:
            print(json.dumps({"epoch": epoch + 1, "epoch_time_s": seconds,
                              "samples_per_s": steps * args.batch_size / seconds}), flush=True)
    del model
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
