"""Rendering a view (train/data/augment.py) of one image into a uint8 tensor [C, S, S].

JPEGs are decoded by simplejpeg where it is installed (train/data/jpeg.py), other files and
every file without it by PIL, chosen by measurement (`make bench`'s data part;
docs/performance.md#decoders); both the same way: a JPEG is decoded at a reduced size when the
view's target is at most half the file's size (PIL's `draft`: the decoder skips DCT
coefficients, 1/2 to 1/8 of the work), then cropped and resized in uint8: by PIL's
`resize(box=...)`, or for simplejpeg's whole-pixel boxes by torch's kernel
(`render_pixels`). torchvision.io's decoder cannot decode at reduced size. Samples of Python
datasets (PIL images or tensors) are rendered with torchvision.transforms.v2's functional ops.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from train.data import jpeg
from train.data.augment import View

# What a file that cannot be decoded raises in PIL: OSError (truncated, broken data),
# SyntaxError (broken PNG chunks), ValueError, DecompressionBombError, EOFError.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def open_image(path: str) -> Image.Image:
    """The file's header, not yet decoded (its size is known)."""
    return Image.open(path)


def render_path(path: str, view_of: Any, decoder: str = "pil") -> torch.Tensor:
    """The file at `path` rendered for `view_of(width, height)`: JPEGs through simplejpeg
    (`decoder` "simplejpeg": train/data/jpeg.py), the rest, and every file for "pil", through
    PIL. Both give the same view of the same pixels."""
    if decoder == "simplejpeg":
        with open(path, "rb") as f:
            data = f.read()
        fast = jpeg.decode(data, view_of, "RGBX")
        if fast is not None:
            pixels, sx, sy, view = fast
            return render_pixels(pixels, View(view.left * sx, view.top * sy, view.width * sx,
                                              view.height * sy, view.size, view.flip))
    with open_image(path) as image:
        return render_file(image, view_of)


def render_pixels(pixels: np.ndarray, view: View) -> torch.Tensor:
    """A view of decoded pixels [H, W, 4] (RGBX: PIL's own layout of RGB, and the 4-byte
    pixels torch's uint8 resampling kernels read fastest).

    A box in whole pixels (every training view decoded at full scale) is cropped, then resized
    by torch's antialiased bilinear kernel, as torchvision's tensor ops render
    RandomResizedCrop: twice as fast as PIL's resize here; PIL also reads a few pixels past the
    box, so edge pixels differ by a few grey levels. A box with fractions (a view decoded at a
    reduced DCT scale) goes to PIL's resize, which samples fractional boxes exactly: rounding
    it would move the crop by up to half a reduced pixel."""
    box = (view.left, view.top, view.width, view.height)
    if any(v != round(v) for v in box):
        image = Image.frombuffer("RGBX", (pixels.shape[1], pixels.shape[0]), pixels, "raw",
                                 "RGBX", 0, 1)  # wraps the buffer: no conversion
        return render_pil(image, view)
    image = torch.from_numpy(pixels).permute(2, 0, 1)  # channels-last strides, no copy
    top, left = round(view.top), round(view.left)
    height, width = max(1, round(view.height)), max(1, round(view.width))
    image = image[:, top:top + height, left:left + width]
    if (height, width) != (view.size, view.size):
        image = F.interpolate(image[None], size=(view.size, view.size), mode="bilinear",
                              antialias=True, align_corners=False)[0]
    image = image[:3]
    return image.flip(-1) if view.flip else image


def render_file(image: Image.Image, view_of: Any) -> torch.Tensor:
    """Decode an opened file for `view_of(width, height)` at the smallest size that keeps the
    view's resolution; RGB uint8 [3, S, S]."""
    width, height = image.size
    view: View = view_of(width, height)
    if image.format == "JPEG":
        # The decoder scales by 1/2, 1/4 or 1/8, keeping at least the requested size.
        image.draft("RGB", (max(1, math.ceil(width * view.size / view.width)),
                            max(1, math.ceil(height * view.size / view.height))))
    sx, sy = image.size[0] / width, image.size[1] / height
    image = image.convert("RGB")
    return render_pil(image, View(view.left * sx, view.top * sy, view.width * sx,
                                  view.height * sy, view.size, view.flip))


def render_pil(image: Image.Image, view: View) -> torch.Tensor:
    """Crop and resize in one PIL call (bilinear, antialiased); uint8 [C, S, S]."""
    if image.mode not in ("RGB", "L", "RGBX"):
        image = image.convert("RGB")
    if not view.is_identity(*image.size):
        box = (view.left, view.top, view.left + view.width, view.top + view.height)
        image = image.resize((view.size, view.size), Image.BILINEAR, box=box)
    if view.flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return pil_to_tensor(image)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """torchvision's `pil_to_tensor` for RGB and L images (uint8 [C, H, W], a view of a copy),
    without importing torchvision (seconds) into every worker and loader process."""
    pixels = torch.from_numpy(np.array(image, copy=True))
    if image.mode == "RGBX":
        pixels = pixels[..., :3]
    return (pixels.unsqueeze(-1) if pixels.ndim == 2 else pixels).permute(2, 0, 1)


def render_tensor(images: torch.Tensor, view: View) -> torch.Tensor:
    """The same view of uint8 images [..., C, H, W] (one or a batch of equal size)."""
    height, width = images.shape[-2:]
    if not view.is_identity(width, height):
        import torchvision.transforms.v2.functional as TF  # only Python datasets' tensors

        top, left = round(view.top), round(view.left)
        h, w = max(1, round(view.height)), max(1, round(view.width))
        images = TF.resized_crop(images, top, left, h, w, [view.size, view.size],
                                 antialias=True)
    return images.flip(-1) if view.flip else images


def as_image(image: Any) -> Image.Image | torch.Tensor:
    """A sample's image as PIL or a uint8 tensor [C, H, W]; ValueError for anything else.

    Accepted: PIL images, uint8 tensors or arrays (CHW, or HWC with 1, 3 or 4 channels),
    float tensors in [0, 1] (CHW, as ToTensor gives).
    """
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
        if image.ndim == 3 and image.shape[-1] in (1, 3, 4) and image.shape[0] not in (1, 3):
            image = image.permute(2, 0, 1)  # HWC, as numpy images come
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"an image must be a PIL image or a tensor, not {type(image).__name__}")
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"an image tensor must be [C, H, W] with 1 or 3 channels; got shape "
                         f"{list(image.shape)}")
    if image.dtype == torch.uint8:
        return image[:3]
    if not image.is_floating_point():
        raise ValueError(f"image tensors must be uint8, or float in [0, 1]; got {image.dtype}")
    if not torch.isfinite(image).all():  # NaN passes the range check below (comparisons fail)
        bad = int((~torch.isfinite(image)).sum())
        raise ValueError(f"float images must be finite; this one holds {bad} NaN or infinite "
                         f"value(s)")
    low, high = image.min().item(), image.max().item()
    if low < 0 or high > 1:
        raise ValueError(f"float images must be in [0, 1] (this tool normalizes them itself); "
                         f"got values in [{low:.3g}, {high:.3g}]")
    return (image[:3] * 255).round().to(torch.uint8)


def render_any(image: Image.Image | torch.Tensor, view: View) -> torch.Tensor:
    if isinstance(image, Image.Image):
        return render_pil(image, view)
    return render_tensor(image, view)


def image_size(image: Image.Image | torch.Tensor) -> tuple[int, int]:
    """(width, height)."""
    if isinstance(image, Image.Image):
        return image.size
    return image.shape[-1], image.shape[-2]
