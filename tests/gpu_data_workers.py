"""What the data-path tests run in a process of their own (importable by name for
`run_single`): on a GPU for the `gpu` tests, on the CPU for their twins."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from tests.workers import DEFAULT_CONFIG
from tools.make_images import write_image_folder


def odd_folder(root: Path) -> dict[str, Path]:
    """16 train JPEGs in 2 classes, of which one is CMYK, one truncated and one a PNG."""
    write_image_folder(root, 16, 4, classes=2, min_size=40, max_size=72)
    files = sorted((root / "train").rglob("*.jpg"))
    cmyk, broken, png = files[3], files[7], files[11]
    image = Image.open(cmyk).convert("CMYK")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    cmyk.write_bytes(buffer.getvalue())
    broken.write_bytes(broken.read_bytes()[:300])
    Image.open(png).save(png.with_suffix(".png"))
    png.unlink()
    return {"cmyk": cmyk, "broken": broken, "png": png.with_suffix(".png")}


def nvjpeg_batch(root: str, device_name: str, split: str = "train") -> dict[str, Any]:
    """The whole train split as one batch through the nvjpeg path's decoder on `device_name`
    (on CUDA: through the stream path's copy-ahead, the views rendered with host syncs as
    errors)."""
    from train.config import load_config
    from train.data import open_datasets
    from train.data.augment import Augment
    from train.data.build import DeviceFinish
    from train.data.counters import DataCounters
    from train.data.nvjpeg import BytesReader, NvjpegDecode, collate_bytes
    from train.data.stream import ahead

    device = torch.device(device_name)
    cfg = load_config(DEFAULT_CONFIG, ["data.name=imagefolder", f"data.root={root}",
                                       "data.image_size=32", "data.augment=imagenet"]).data
    train, _ = open_datasets(cfg, 0)
    reader = BytesReader(train, Augment(cfg, 32, 0), split)
    counters = DataCounters(True)
    decoder = NvjpegDecode(reader, device, DeviceFinish(None, device, False, counters))
    raw = next(ahead(iter([collate_bytes([reader[(1, i)] for i in range(len(train))])]),
                     device))
    where = {"labels": raw[1].device.type, "indices": raw[2].device.type}
    if device.type == "cuda":
        render = decoder._render

        def strict(*args: Any) -> torch.Tensor:
            torch.cuda.set_sync_debug_mode("error")  # a host sync while rendering raises
            try:
                return render(*args)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        decoder._render = strict
    x, y = decoder(raw, 1)
    return {"x": x.cpu(), "y": y.cpu(), "host": where, "cpu_decoded": decoder.cpu_decoded,
            "skipped": counters.skipped, "labels": train.labels.tolist(),
            "paths": [str(p) for p in train.paths]}
