"""Views (crop, resize, flip) of a batch of images of different sizes, rendered together on
their device: the nvjpeg path's images arrive decoded on the GPU one tensor per file.

Rendering them one at a time costs several small kernels per image (a thousand per ImageNet
batch, each waiting on the host). Here images of the same size are stacked and all their boxes
resampled by one `roi_align` (its adaptive sampling averages over each output pixel's box, the
antialiasing a downscale needs), then the flips of the whole batch are one `where`: a few
kernels per distinct image size. ImageNet's images come in few sizes (500x375 and 375x500 are
most of them), so a batch is a few dozen launches, none of which waits on the host.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torchvision.ops import roi_align

from train.data.augment import View


def crop_box(view: View) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) in whole pixels, rounded as `render_tensor` rounds them."""
    left, top = round(view.left), round(view.top)
    return left, top, left + max(1, round(view.width)), top + max(1, round(view.height))


def render_batch(images: list[torch.Tensor], views: list[View]) -> torch.Tensor:
    """uint8 images [C, H, W] (sizes may differ) and one view each -> uint8 [B, C, S, S]."""
    if len(images) != len(views) or not images:
        raise ValueError(f"{len(images)} images for {len(views)} views")
    size, channels = views[0].size, images[0].shape[0]
    device = images[0].device
    out = torch.empty((len(images), channels, size, size), dtype=torch.float32, device=device)
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        groups[tuple(image.shape)].append(i)
    for members in groups.values():
        stacked = torch.stack([images[i] for i in members]) if len(members) > 1 else \
            images[members[0]][None]
        boxes = to_device([[j, *crop_box(views[i])] for j, i in enumerate(members)],
                          torch.float32, device)
        # aligned=True: box edges on pixel edges, so a box of the whole image at its own size
        # reads every pixel at its center (the identity, exactly).
        rendered = roi_align(stacked.float(), boxes, (size, size), spatial_scale=1.0,
                             sampling_ratio=0, aligned=True)
        if len(members) == len(images):
            out = rendered
        else:
            out.index_copy_(0, to_device(members, torch.long, device), rendered)
    flips = to_device([v.flip for v in views], torch.bool, device)
    out = torch.where(flips[:, None, None, None], out.flip(-1), out)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on `device` without making the host wait: a copy from pageable memory
    waits for the work queued before it; one from pinned memory is queued behind it."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)
