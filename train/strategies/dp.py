"""nn.DataParallel: ONE process drives every visible GPU (the book's concise implementation)."""

from __future__ import annotations

import torch
from torch import nn

from common.host import visible_gpus
from train.strategies.base import Strategy


class DataParallel(Strategy):
    """nn.DataParallel: one process drives every GPU; the batch is scattered from the first one.

    The first GPU also gathers the outputs and computes the loss, so it runs out of memory
    first. On a machine without GPUs DataParallel has nothing to split.
    """

    name = "dp"
    measures_sync = False  # inside forward and backward, not separable
    sync_method = ("included in compute: DataParallel replicates the model in forward and "
                   "reduces gradients onto the first GPU in backward")

    def devices(self) -> list[torch.device]:
        # Every GPU it drives: the first one's larger peak is the imbalance to show.
        if self.ctx.device.type == "cpu":
            return [self.ctx.device]
        return [torch.device("cuda", i) for i in range(visible_gpus())]

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.ctx.device.type == "cpu":
            # DataParallel takes every visible GPU by default: with `--cpu` on a GPU machine it
            # would demand the model on cuda:0. On the CPU there is nothing to split.
            return model
        return nn.DataParallel(model)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.DataParallel) else model

    def eval_model(self, model: nn.Module, plain: nn.Module) -> nn.Module:
        return model  # scatter evaluation batches over the GPUs too
