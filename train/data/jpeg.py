"""The CPU decoder's fast path for JPEG files: simplejpeg, a maintained binding to libjpeg-turbo
that ships the library inside its wheel (no system package), chosen by measurement
(docs/performance.md#decoders).

A file is read once as bytes; its header gives the size, the view is drawn for it, and the
file is decoded at the coarsest power-of-two DCT scale (1/8, 1/4, 1/2, 1) that keeps the view's
resolution: the same scale PIL's `draft` picks, so both paths decode the same pixels (the same
libjpeg-turbo, islow DCT, fancy upsampling); train/data/decode.py's `render_pixels` renders
the view. libjpeg-turbo's other scales (3/8, 5/8, ...) have no SIMD code and decoded slower
than full size here.

What this path does not take goes to PIL (train/data/decode.py): files that are not JPEG
(PNG, ...), CMYK and YCCK JPEGs, headers simplejpeg cannot read; and every file when
simplejpeg is not installed or `data.decoder=pil`.

Decoding only the crop window (libjpeg-turbo's jpeg_crop_scanline and jpeg_skip_scanlines,
what DALI's ROI decoding uses) is not offered by any binding that installs here: simplejpeg
and Pillow decode whole images, and PyTurboJPEG 2.x needs libturbojpeg 3.0 (Debian 12 has 2.1)
and offers crops only as a lossless transform that re-encodes the window.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

try:
    import simplejpeg
except ImportError:  # PIL decodes every file
    simplejpeg = None

SOI = b"\xff\xd8"
_DIRECT = ("YCbCr", "Gray", "RGB")  # colorspaces libjpeg-turbo converts to RGB itself


def available() -> bool:
    return simplejpeg is not None


def resolve(decoder: str) -> str:
    """`data.decoder` as run: auto is simplejpeg when it is installed, else pil."""
    if decoder == "auto":
        return "simplejpeg" if available() else "pil"
    return decoder


def draft_factor(width: int, height: int, want_width: int, want_height: int) -> int:
    """PIL's `draft` choice: the largest of 8, 4, 2, 1 that divides the size into at least
    the wanted one."""
    scale = min(width // max(1, want_width), height // max(1, want_height))
    return next((s for s in (8, 4, 2, 1) if scale >= s), 1)


def decode(data: bytes, view_of: Any,
           mode: str = "RGB") -> tuple[np.ndarray, float, float, Any] | None:
    """(uint8 pixels [h, w, 3] at the view's DCT scale, x scale, y scale, the view), or None
    for a file this path does not take (PIL decodes it). `mode` "RGBX": [h, w, 4], PIL's own
    layout of RGB, which it then reads without a copy."""
    if simplejpeg is None or data[:2] != SOI:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in _DIRECT or not 0 < width * height <= Image.MAX_IMAGE_PIXELS:
        return None  # PIL converts CMYK its own way, and refuses decompression bombs
    view = view_of(width, height)
    # As render_file asks PIL's draft for it, so that both paths pick the same scale.
    want_w = max(1, math.ceil(width * view.size / view.width))
    want_h = max(1, math.ceil(height * view.size / view.height))
    s = draft_factor(width, height, want_w, want_h)
    try:
        pixels = simplejpeg.decode_jpeg(data, mode, min_width=-(-width // s),
                                        min_height=-(-height // s))
    except ValueError:
        return None  # broken data: PIL decodes what it can or names the problem
    return pixels, pixels.shape[1] / width, pixels.shape[0] / height, view
