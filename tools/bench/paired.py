"""Framework overhead, paired in time: the workers of one torchrun job hold both `make train`'s
trainer (built by `train.worker.build_trainer` from configs/default.yaml) and the minimal loop
(tools/bench/minimal_ddp.py), and run their epochs in turn on the same process group, data,
threads and allocator: ours, minimal, minimal, ours, ours, minimal, ...

This machine's speed drifts by tens of percent within seconds, so separate runs minutes apart
cannot resolve a few percent; adjacent epochs of one process can. Each pair gives a ratio;
prints one JSON line per pair from rank 0 (the first pair is a warm-up).

    torchrun --nproc-per-node 2 -m tools.bench.paired --pairs 12
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from tools.bench.minimal_ddp import MinimalLoop, page_faults
from train import dist
from train.config import load_config
from train.loop.trainer import Trainer
from train.run.folder import NullRun
from train.strategies import make_strategy
from train.worker import build_trainer

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


def ours_epoch(trainer: Trainer) -> Callable[[int], float]:
    """An epoch of the trainer's own loop (`Trainer.train_epoch`, its step timer, guards and
    meters; not its evaluation), closed as `fit` closes it; its seconds as the record says."""
    def run(_epoch: int) -> float:
        result = trainer.train_epoch()
        trainer.parts.state.end_epoch()
        trainer.parts.totals.reset()
        return result.seconds
    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=12, help="after one warm-up pair")
    parser.add_argument("--train-samples", type=int, default=8_000, help="per epoch")
    args = parser.parse_args()
    epochs = 2 * (args.pairs + 1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(CONFIG, [f"data.synthetic.train_samples={args.train_samples}",
                                   "data.synthetic.test_samples=64", f"train.epochs={epochs}",
                                   "wandb.mode=disabled", f"run.dir={tmp}/run"])
        ctx = dist.setup(cfg.dist)  # threads, denormals, malloc limits, process group: as train
        trainer = build_trainer(cfg, ctx, make_strategy(cfg, ctx), NullRun(Path(cfg.run.dir)))
        trainer.parts.guards.stop.begin()
        minimal = MinimalLoop(ctx.rank, ctx.world_size, cfg.train.batch_size,
                              args.train_samples, cfg.optim.lr, epochs)
        assert minimal.steps == trainer.parts.schedule.steps_per_epoch, "not the same epoch"
        samples = minimal.steps * cfg.train.batch_size
        sides = {"ours": ours_epoch(trainer), "minimal": minimal.epoch}
        for pair in range(args.pairs + 1):
            figures = {}
            order = ("ours", "minimal") if pair % 2 == 0 else ("minimal", "ours")
            for name in order:
                before = page_faults()
                seconds = sides[name](pair)
                figures[name] = {"samples_per_s": samples / seconds,
                                 "page_faults_per_step": (page_faults() - before) / minimal.steps}
            if ctx.is_main:
                print(json.dumps({"pair": pair, "first": order[0], **figures,
                                  "ratio": figures["ours"]["samples_per_s"]
                                  / figures["minimal"]["samples_per_s"]}), flush=True)
        del trainer, minimal
        dist.teardown(ctx)


if __name__ == "__main__":
    main()
