"""What a recipe adds around the loss: label smoothing, mixup and CutMix, and an exponential
moving average of the weights.

Mixing pairs each sample with the one half a batch away (`roll(b / 2)`), with one factor per
step drawn from (seed, step): a worker's share of a global batch holds every other sample of
it (DistributedSampler), so half its share away is half the global batch away, and N workers
mix exactly the pairs one process mixes. A resume draws the same factors again.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.schema import TrainConfig


class Criterion:
    """Cross-entropy against labels of shape (batch, 2): the sample's and its partner's, mixed
    with weight `lam` (1: no mixing), with `train.label_smoothing`."""

    def __init__(self, smoothing: float):
        self.smoothing = smoothing

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, lam: float) -> torch.Tensor:
        own = F.cross_entropy(logits, labels[:, 0], label_smoothing=self.smoothing)
        if lam == 1.0:
            return own
        partner = F.cross_entropy(logits, labels[:, 1], label_smoothing=self.smoothing)
        return lam * own + (1 - lam) * partner

    @staticmethod
    def correct(logits: torch.Tensor, labels: torch.Tensor, lam: float) -> torch.Tensor:
        """Right answers against the dominant label (the sample's own unless mixed below 1/2)."""
        return (logits.argmax(1) == labels[:, 0 if lam >= 0.5 else 1]).sum()


class Mixing:
    """Mixup (Zhang et al.) and CutMix (Yun et al.) on the device, one factor per step."""

    def __init__(self, cfg: TrainConfig, seed: int):
        self.mixup, self.cutmix, self.prob = cfg.mixup_alpha, cfg.cutmix_alpha, cfg.cutmix_prob
        self.seed = seed

    @property
    def on(self) -> bool:
        return bool(self.mixup or self.cutmix)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(images, labels (batch, 2), the own label's weight) for optimizer step `step`."""
        partner_labels = labels.roll(labels.shape[0] // 2, 0)
        pair = torch.stack([labels, partner_labels], 1)
        if not self.on:
            return images, pair, 1.0
        rng = np.random.default_rng([self.seed, step, 0x6D6978])
        use_cutmix = self.cutmix and (not self.mixup or rng.random() < self.prob)
        lam = float(rng.beta(*(2 * [self.cutmix if use_cutmix else self.mixup])))
        partner = images.roll(images.shape[0] // 2, 0)
        if not use_cutmix:
            return images * lam + partner * (1 - lam), pair, lam
        height, width = images.shape[-2:]
        cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        mixed = images.clone()
        mixed[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        # The weight of the label is the share of pixels the sample kept.
        return mixed, pair, 1 - (bottom - top) * (right - left) / (height * width)


class ModelEma:
    """An exponential moving average of the model's parameters (its buffers are the model's,
    copied before each evaluation); a checkpointed part, the same on every rank."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """After each optimizer step: ema += (1 - decay) * (param - ema)."""
        weight = 1 - self.current_decay()
        torch._foreach_lerp_(list(self.module.parameters()), list(model.parameters()), weight)
        self.updates += 1

    @torch.no_grad()
    def take_buffers(self, model: nn.Module) -> nn.Module:
        """The average with the model's batch-norm statistics, ready to evaluate."""
        for mine, theirs in zip(self.module.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)
        return self.module

    def state_dict(self) -> dict:
        return {"updates": self.updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["module"])
