"""Augmentation recipes by name (`data.augment`): what each split's images go through, on both
paths, with every random choice drawn from the sample's key (seed, epoch, index).

Every recipe is a geometric view of the source image (a box in its pixels, resized to a square
of `size`, maybe mirrored) plus, for `cifar`, a shift inside zero padding:

- `imagenet`: training takes torchvision's RandomResizedCrop box (scale, ratio) and a flip;
  evaluation resizes the shorter side to size / eval_crop and takes the center (0.875: 224 of
  256).
- `cifar`: the image at `size`, padded by `padding` zeros, cropped back at a random offset,
  flipped.
- `none`: the image at `size` (the center square, resized when its size differs).

The stream path renders views per sample in its loader processes (train/data/decode.py). The
memory path and the decoded cache hold each training image once as a stored square (tensor
datasets: as they are; files: the center square at `stored_size`) and draw the same recipe
from it as batched tensor ops on the device (`device_train`): flips, shifts and crops per
sample in one op each. The `cifar` shift is the same code on both paths, so both give the same
bits; `imagenet` crops a stored square on the device with bilinear sampling.

Later recipe parts that work on whole batches (mixup, cutmix) belong after `device_train`,
on both paths: `Augment.device_train` is the one place a batch passes on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.schema import DataConfig
from train.data.keys import batch_keys, batch_uniforms, sample_key, uniforms

_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before its fallback
_IMAGENET_DRAWS = 4 * _ATTEMPTS + 1  # area, ratio, top, left per attempt; the flip


@dataclass(frozen=True)
class View:
    """A box of the source image (pixels, may be fractional) resized to `size` x `size`."""

    left: float
    top: float
    width: float
    height: float
    size: int
    flip: bool = False

    def is_identity(self, width: int, height: int) -> bool:
        """The view is the whole source as it is: nothing to resample."""
        return (not self.flip and self.left == 0 and self.top == 0 and self.size == width
                and self.size == height and self.width == width and self.height == height)


def center_view(width: int, height: int, size: int, fraction: float = 1.0) -> View:
    """The center square (`fraction` of the shorter side) at `size`."""
    side = min(width, height) * fraction
    return View((width - side) / 2, (height - side) / 2, side, side, size)


def rrc_box(width: int, height: int, u: list[float], scale: list[float],
            ratio: list[float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (top, left, height, width), drawn from `u`."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for a in range(_ATTEMPTS):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[4 * a])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[4 * a + 1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return (math.floor(u[4 * a + 2] * (height - h + 1)),
                    math.floor(u[4 * a + 3] * (width - w + 1)), h, w)
    return _fallback_box(width, height, ratio)


def _fallback_box(width: int, height: int, ratio: list[float]) -> tuple[int, int, int, int]:
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class Augment:
    """One recipe at one training resolution: the views per split and the device ops."""

    def __init__(self, cfg: DataConfig, size: int, seed: int):
        self.name, self.size, self.seed = cfg.augment, size, seed
        self.imagenet, self.cifar = cfg.imagenet, cfg.cifar
        # The stored square a training image is kept as (memory path, decoded cache): large
        # enough for imagenet's crops to keep the evaluation's resolution.
        self.stored_size = (math.floor(size / cfg.imagenet.eval_crop)
                            if self.name == "imagenet" else size)

    @property
    def random(self) -> bool:
        return self.name != "none"

    # --- per sample, on the source image (stream path) ---------------------------------------

    def train_view(self, width: int, height: int, epoch: int, index: int) -> View:
        """The view a training sample renders (cifar: before its shift, `sample_shift`)."""
        if self.name != "imagenet":
            return center_view(width, height, self.size)
        u = uniforms(sample_key(self.seed, epoch, index), _IMAGENET_DRAWS)
        top, left, h, w = rrc_box(width, height, u, self.imagenet.scale, self.imagenet.ratio)
        return View(left, top, w, h, self.size, flip=u[-1] < self.imagenet.flip)

    def eval_view(self, width: int, height: int) -> View:
        if self.name == "imagenet":
            resized = math.floor(self.size / self.imagenet.eval_crop)
            return center_view(width, height, self.size, self.size / resized)
        return center_view(width, height, self.size)

    def stored_view(self, width: int, height: int) -> View:
        """A training image as the memory path and the cache keep it."""
        return center_view(width, height, self.stored_size)

    def sample_shift(self, image: torch.Tensor, epoch: int, index: int) -> torch.Tensor:
        """cifar's pad, crop and flip of one rendered uint8 image [C, S, S] (others: as is)."""
        if self.name != "cifar":
            return image
        keys = batch_keys(self.seed, epoch, torch.tensor([index]))
        return self._shift(image[None], batch_uniforms(keys, 3))[0]

    # --- whole batches from stored squares (memory path, decoded cache) -----------------------

    def device_train(self, images: torch.Tensor, indices: torch.Tensor,
                     epoch: int) -> torch.Tensor:
        """Training batch [B, C, H, W] (float, 0..255 units) of stored squares -> [B, C, S, S]."""
        if self.name == "imagenet":
            u = batch_uniforms(batch_keys(self.seed, epoch, indices), _IMAGENET_DRAWS)
            return self._resized_crops(images, u)
        if images.shape[-1] != self.size or images.shape[-2] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear",
                                   antialias=True, align_corners=False)
        if self.name == "cifar":
            images = self.shift(images, indices, epoch)
        return images

    def shift(self, images: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        """cifar's pad, crop and flip of a batch [B, C, S, S] (uint8 or float), per sample."""
        return self._shift(images, batch_uniforms(batch_keys(self.seed, epoch, indices), 3))

    def _shift(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Pad by `padding` zeros, crop back at offsets u[:, 0], u[:, 1], flip where u[:, 2]."""
        pad, (n, c, h, w) = self.cifar.padding, images.shape
        padded = F.pad(images, (pad, pad, pad, pad))
        dy = (u[:, 0] * (2 * pad + 1)).floor().long()
        dx = (u[:, 1] * (2 * pad + 1)).floor().long()
        rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
        out = padded.gather(2, rows.expand(n, c, h, w + 2 * pad))
        out = out.gather(3, cols.expand(n, c, h, w))
        flip = (u[:, 2] < self.cifar.flip)[:, None, None, None]
        return torch.where(flip, out.flip(3), out)

    def _resized_crops(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """RandomResizedCrop per sample, as one affine grid_sample (bilinear) for the batch."""
        n, _, height, width = images.shape
        top, left, h, w = rrc_boxes(width, height, u, self.imagenet.scale, self.imagenet.ratio)
        sx, sy = w / width, h / height
        sx = torch.where(u[:, -1] < self.imagenet.flip, -sx, sx)
        theta = torch.zeros(n, 2, 3, dtype=torch.float64, device=images.device)
        theta[:, 0, 0], theta[:, 0, 2] = sx, (2 * left + w) / width - 1
        theta[:, 1, 1], theta[:, 1, 2] = sy, (2 * top + h) / height - 1
        grid = F.affine_grid(theta.to(images.dtype), [n, images.shape[1], self.size, self.size],
                             align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                             align_corners=False)


def rrc_boxes(width: int, height: int, u: torch.Tensor, scale: list[float],
              ratio: list[float]) -> tuple[torch.Tensor, ...]:
    """`rrc_box` for a batch of draws u [B, 41]: (top, left, height, width) float64 tensors."""
    attempts = u[:, :4 * _ATTEMPTS].view(-1, _ATTEMPTS, 4)
    target = width * height * (scale[0] + (scale[1] - scale[0]) * attempts[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * attempts[..., 1])
    w, h = (target * aspect).sqrt().round(), (target / aspect).sqrt().round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.double().argmax(1, keepdim=True)  # the first attempt that fits

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.gather(1, first)[:, 0]

    w, h = pick(w), pick(h)
    top = (pick(attempts[..., 2]) * (height - h + 1)).floor()
    left = (pick(attempts[..., 3]) * (width - w + 1)).floor()
    fb_top, fb_left, fb_h, fb_w = _fallback_box(width, height, ratio)
    found = ok.any(1)
    return (torch.where(found, top, fb_top), torch.where(found, left, fb_left),
            torch.where(found, h, fb_h), torch.where(found, w, fb_w))
