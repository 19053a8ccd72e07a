"""Evaluation over the whole test set: each sample counted once across ranks, one all_reduce."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from train.dist import DistContext


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             ctx: DistContext, autocast: Callable[[], contextlib.AbstractContextManager],
             num_classes: int | None = None) -> dict[str, Any]:
    """Loss and accuracy of `model` over every rank's batches (no collective per batch); with
    `num_classes`, also top-5 accuracy and the confusion matrix (rows: true classes)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # loss, correct, n, top-5
    confusion = None
    if num_classes is not None:
        confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64,
                                device=ctx.device)
    for images, labels in batches:
        with autocast():
            logits = model(images)
        predicted = logits.argmax(1)
        totals[0] += F.cross_entropy(logits, labels, reduction="sum")
        totals[1] += (predicted == labels).sum()
        totals[2] += labels.shape[0]
        if confusion is not None:
            top = logits.topk(min(5, logits.shape[1]), 1).indices
            totals[3] += (top == labels[:, None]).any(1).sum()
            # Counted in place, on the device: bincount's output size depends on the largest
            # value, which it reads back to the host (a sync per batch on a GPU).
            cells = labels * num_classes + predicted
            confusion.index_add_(0, cells, torch.ones_like(cells, dtype=confusion.dtype))
    if ctx.distributed:
        dist.all_reduce(totals)
        if confusion is not None:
            dist.all_reduce(confusion)
    model.train(was_training)
    loss_sum, correct, samples, top5 = totals.tolist()
    result: dict[str, Any] = {"loss": loss_sum / samples, "accuracy": correct / samples,
                              "correct": correct, "samples": samples}
    if confusion is not None:
        result["top5_accuracy"] = top5 / samples
        result["confusion"] = confusion.view(num_classes, num_classes).long().cpu()
    return result
