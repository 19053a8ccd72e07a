"""What bounds the loaders of tools/bench/loaders.py, measured rather than guessed:

- `stream_stages`: our stream path's work per sample split into its stages (read, header and
  view, decode, crop and resize and flip, collate, normalize), on the same files and views;
  what the loader spends beyond their sum is the rest (DataLoader, Python per sample).
- `cache_storage`: the decoded cache at this size: its stored square (FFCV's max_resolution),
  bytes per image raw and re-encoded as JPEG (quality 90), so size on disk per million images,
  the rate of its CPU part (gathering random batches from the memory-mapped file) and what
  decoding re-encoded squares would cost instead.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.config import load_config
from train.data import jpeg
from train.data.augment import Augment, View
from train.data.decode import render_path, render_pixels
from train.data.imagefolder import scan

REPO = Path(__file__).resolve().parents[2]
MILLION = 1_000_000
BATCH = 64
MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None] * 255
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None] * 255


def _files(root: Path, count: int) -> tuple[list[str], Any]:
    cfg = load_config(REPO / "configs" / "default.yaml", [
        "data.name=imagefolder", f"data.root={root}", "data.augment=imagenet"]).data
    files, _ = scan(cfg)
    return [files.paths[i] for i in range(min(count, len(files)))], cfg


def stream_stages(root: Path, size: int, count: int = 200) -> dict[str, float]:
    """ms per sample of each stage of data.decoder=simplejpeg's render (train/data/decode.py)."""
    import simplejpeg

    paths, cfg = _files(root, count)
    augment = Augment(cfg, size, 0)
    spent = dict.fromkeys(("read", "header, view", "decode", "crop, resize, flip"), 0.0)
    spent.update({"collate (per batch of 64)": 0.0, "normalize (per batch of 64)": 0.0})
    rendered: list[torch.Tensor] = []
    for i, path in enumerate(paths):
        marks = [time.perf_counter()]
        data = Path(path).read_bytes()
        marks.append(time.perf_counter())
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        view = augment.train_view(width, height, 0, i)
        marks.append(time.perf_counter())
        pixels, sx, sy, _ = jpeg.decode(data, lambda w, h, v=view: v, "RGBX")
        marks.append(time.perf_counter())
        rendered.append(render_pixels(pixels, View(view.left * sx, view.top * sy,
                                                   view.width * sx, view.height * sy,
                                                   view.size, view.flip)))
        marks.append(time.perf_counter())
        if len(rendered) == BATCH:
            batch = torch.stack(rendered)  # as stream.collate
            marks.append(time.perf_counter())
            batch.float().sub_(MEAN).div_(STD).contiguous(memory_format=torch.channels_last)
            marks.append(time.perf_counter())  # as build.DeviceFinish, on the CPU
            rendered = []
        for key, start, end in zip(spent, marks, marks[1:], strict=False):
            spent[key] += end - start
    batched = len(paths) // BATCH * BATCH or 1  # the samples the batch stages ran for
    out = {k: 1000 * v / (batched if "batch" in k else len(paths)) for k, v in spent.items()}
    out["total"] = sum(out.values())
    return out


def cache_storage(root: Path, size: int, count: int = 200, batch: int = 64) -> dict[str, Any]:
    """The decoded cache's storage at training size `size`, measured on `count` files."""
    import simplejpeg

    paths, cfg = _files(root, count)
    augment = Augment(cfg, size, 0)
    side = augment.stored_size
    squares = [render_path(p, augment.stored_view, "simplejpeg") for p in paths]
    raw = 3 * side * side
    encoded = [simplejpeg.encode_jpeg(np.ascontiguousarray(s.permute(1, 2, 0).numpy()), 90)
               for s in squares]
    start = time.perf_counter()
    for blob in encoded:
        simplejpeg.decode_jpeg(blob, "RGB")
    decode_rate = len(encoded) / (time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        mapped = np.lib.format.open_memmap(Path(tmp) / "c.npy", "w+", np.uint8,
                                           (len(squares), 3, side, side))
        mapped[:] = torch.stack(squares).numpy()
        mapped.flush()
        order = np.random.default_rng(0).permutation(len(squares))
        start, done = time.perf_counter(), 0
        for first in range(0, len(order) - batch + 1, batch):
            torch.from_numpy(np.asarray(mapped[np.sort(order[first:first + batch])]))
            done += batch
        gather_rate = done / (time.perf_counter() - start)
        del mapped
    mean_jpeg = float(np.mean([len(b) for b in encoded]))
    return {"stored_side": side, "raw_bytes": raw, "jpeg_q90_bytes": mean_jpeg,
            "raw_gb_per_million": raw * MILLION / 1e9,
            "jpeg_gb_per_million": mean_jpeg * MILLION / 1e9,
            "gather_per_s": gather_rate, "jpeg_decode_per_s": decode_rate,
            "source_bytes": float(np.mean([Path(p).stat().st_size for p in paths]))}


def describe(stages: dict[str, float], stream_rate: float) -> list[str]:
    """The profile's lines: each stage's share of the time per sample on the core."""
    per_sample = 1000 / stream_rate
    rest = max(0.0, per_sample - stages["total"])
    parts = [(k, v) for k, v in stages.items() if k != "total"] + \
        [("the rest: DataLoader, Python per sample, the machine's noise", rest)]
    return [f"| {k} | {v:.3f} | {v / per_sample:.0%} |" for k, v in parts]

