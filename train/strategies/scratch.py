"""Workers without a wrapper: our own gradient allreduce on point-to-point messages."""

from __future__ import annotations

from torch import nn

from common.schema import ScratchConfig
from train.dist import DistContext
from train.strategies import allreduce
from train.strategies.base import Strategy


class Scratch(Strategy):
    """Our own gradient allreduce on point-to-point messages (allreduce.py beside this file),
    no wrapper."""

    name = "scratch"
    sync_method = "measured: wall time around our allreduce of the gradients"

    def __init__(self, ctx: DistContext, cfg: ScratchConfig):
        super().__init__(ctx)
        self.cfg = cfg

    def wrap(self, model: nn.Module) -> nn.Module:
        # Start every replica from rank 0's weights, as DDP does.
        for tensor in [*model.parameters(), *model.buffers()]:
            allreduce.broadcast(tensor.data, src=0)
        bucket_mb = None if self.cfg.per_parameter else self.cfg.bucket_mb
        self.gradients = allreduce.GradientSync(model.parameters(), self.cfg.algorithm,
                                                bucket_mb)
        return model

    def sync_gradients(self, model: nn.Module) -> None:
        self.gradients.sync()

    def sync_buffers(self, model: nn.Module) -> None:
        for buffer in model.buffers():
            allreduce.broadcast(buffer, src=0)
