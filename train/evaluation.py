"""Evaluation over the whole test set: each sample counted once across ranks, one all_reduce."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from train.dist import DistContext


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             ctx: DistContext,
             autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, float]:
    """Loss and accuracy of `model` over every rank's batches (no collective per batch)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss sum, correct, n
    for images, labels in batches:
        with autocast():
            logits = model(images)
        totals[0] += F.cross_entropy(logits, labels, reduction="sum")
        totals[1] += (logits.argmax(1) == labels).sum()
        totals[2] += labels.shape[0]
    if ctx.distributed:
        dist.all_reduce(totals)
    model.train(was_training)
    loss_sum, correct, samples = totals.tolist()
    return {"loss": loss_sum / samples, "accuracy": correct / samples,
            "correct": correct, "samples": samples}
