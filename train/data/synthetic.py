"""The synthetic dataset: a learnable but not trivial image task, generated from the seed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.schema import SyntheticConfig
from train.data.tensors import TensorData


def make_synthetic(cfg: SyntheticConfig, seed: int) -> tuple[TensorData, TensorData]:
    """A `cfg.num_classes`-class image task, deterministic from `seed`.

    Each class has a smooth random prototype; a sample blends its class prototype with another
    class's (up to 55%, so some samples are ambiguous), gets its own contrast, brightness and
    a shift of up to 2 pixels, then Gaussian noise. Train and test samples are drawn from the
    same distribution.
    """
    gen = torch.Generator().manual_seed(seed)
    k, c, side = cfg.num_classes, cfg.channels, cfg.image_size
    coarse = torch.rand(k, c, 7, 7, generator=gen)
    prototypes = F.interpolate(coarse, size=(side + 4, side + 4), mode="bilinear",
                               align_corners=False)
    train = _draw(prototypes, cfg.train_samples, side, gen)
    test = _draw(prototypes, cfg.test_samples, side, gen)
    return TensorData(*train, k), TensorData(*test, k)


def _draw(prototypes: torch.Tensor, n: int, side: int,
          gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k = prototypes.shape[0]
    labels = torch.randint(k, (n,), generator=gen)
    other = torch.randint(k, (n,), generator=gen)
    mix = 0.55 * torch.rand(n, 1, 1, 1, generator=gen)
    x = (1 - mix) * prototypes[labels] + mix * prototypes[other]
    contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=gen)
    brightness = 0.3 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    x = x * contrast + brightness
    # Crop a side x side window at a random offset in [0, 4]: a shift of up to +-2 pixels.
    dy, dx = torch.randint(5, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(side))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(side))[:, None, None, :]
    x = x.gather(2, rows.expand(n, x.shape[1], side, x.shape[3]))
    x = x.gather(3, cols.expand(n, x.shape[1], side, side))
    x = x + 0.35 * torch.randn(x.shape, generator=gen)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels
