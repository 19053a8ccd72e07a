"""The same LeNet epochs written the way people write them elsewhere, for `make bench`:

- plain: a hand-written DDP loop as in the PyTorch tutorial (TensorDataset, DataLoader with
  DistributedSampler, default settings);
- lightning: PyTorch Lightning's Trainer with its DDP strategy;
- accelerate: HF Accelerate's Accelerator.

Same synthetic data (in memory), model, optimizer and global batch as `make train`. Start with
torchrun, one thread per worker (torchrun's default); rank 0 prints one JSON line per epoch:

    torchrun --nproc-per-node 2 -m tools.bench.peers plain --epochs 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from common.schema import SyntheticConfig
from models import build_model
from train.config import load_config
from train.data import make_synthetic


def dataset(samples: int) -> TensorDataset:
    data, _ = make_synthetic(SyntheticConfig(train_samples=samples, test_samples=1), seed=0)
    images = data.images.float().div_(255)
    return TensorDataset((images - images.mean()) / images.std(), data.labels)


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def report(epoch: int, seconds: float, samples: int) -> None:
    print(json.dumps({"epoch": epoch, "epoch_time_s": seconds,
                      "samples_per_s": samples / seconds}), flush=True)


def plain(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = dataset(args.train_samples)
    sampler = DistributedSampler(data, drop_last=True)
    loader = DataLoader(data, batch_size=args.batch_size // world, sampler=sampler, drop_last=True)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(lenet())
    opt = optimizer(model)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        dist.barrier()
        if rank == 0:
            report(epoch + 1, time.perf_counter() - start, len(loader) * args.batch_size)
    del model
    dist.destroy_process_group()


def lightning(args: argparse.Namespace) -> None:
    import lightning as L

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = lenet()

        def training_step(self, batch, index):
            images, labels = batch
            return F.cross_entropy(self.net(images), labels)

        def configure_optimizers(self):
            return optimizer(self)

    class EpochClock(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            if trainer.global_rank == 0:
                batches = trainer.num_training_batches
                report(trainer.current_epoch + 1, time.perf_counter() - self.start,
                       batches * args.batch_size)

    torch.manual_seed(0)
    world = int(__import__("os").environ["WORLD_SIZE"])
    loader = DataLoader(dataset(args.train_samples), batch_size=args.batch_size // world,
                        shuffle=True, drop_last=True)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy="ddp",
                        max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[EpochClock()])
    trainer.fit(Lit(), loader)


def accelerate(args: argparse.Namespace) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    world = accelerator.num_processes
    torch.manual_seed(0)
    model = lenet()
    loader = DataLoader(dataset(args.train_samples), batch_size=args.batch_size // world,
                        shuffle=True, drop_last=True)
    model, opt, loader = accelerator.prepare(model, optimizer(model), loader)
    for epoch in range(args.epochs):
        start = time.perf_counter()
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            opt.zero_grad()
            accelerator.backward(loss)
            opt.step()
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            report(epoch + 1, time.perf_counter() - start, len(loader) * args.batch_size)
    accelerator.end_training()


def lenet() -> torch.nn.Module:
    """LeNet initialized as configs/default.yaml says (`make train` is what we compare)."""
    init = load_config(Path(__file__).resolve().parents[2] / "configs" / "default.yaml").model.init
    return build_model("lenet", 1, 10, 28, init=init)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("framework", choices=["plain", "lightning", "accelerate"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256, help="global batch")
    parser.add_argument("--train-samples", type=int, default=24_000)
    args = parser.parse_args()
    {"plain": plain, "lightning": lightning, "accelerate": accelerate}[args.framework](args)


if __name__ == "__main__":
    main()
