"""The decoder's limit beside the loaders (tools/bench/loaders.py): libjpeg-turbo's own decode
rate on the same photographs, one thread, the files' bytes in memory, nothing else done.

- full size (simplejpeg);
- at the DCT scale the training view needs (simplejpeg, train/data/jpeg.py's choice);
- the crop window only (DALI's CPU decoder, `decoders.image_random_crop`: libjpeg-turbo's
  jpeg_crop_scanline / jpeg_skip_scanlines on a RandomResizedCrop window of the same
  distribution), beside DALI's full decode of the same files as its calibration.

No binding that installs here decodes a crop window for us (train/data/jpeg.py), so DALI's
decoder is the one ROI figure; at 224 px the DCT scale is 1 for nearly every view.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from train.config import load_config
from train.data import jpeg
from train.data.augment import Augment
from train.data.imagefolder import scan

REPO = Path(__file__).resolve().parents[2]

def _best_rate(fn: Callable[[], int], rounds: int = 1) -> float:
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        count = fn()
        best = max(best, count / (time.perf_counter() - start))
    return best


def _dali_rate(paths: list[str], roi: bool) -> float:
    from nvidia.dali import fn, pipeline_def, types

    batch = 32

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=0,
                  prefetch_queue_depth=1)
    def pipe() -> Any:
        jpegs, _ = fn.readers.file(files=paths, random_shuffle=False)
        if roi:
            return fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB)
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)

    built = pipe()
    built.build()
    steps = len(paths) // batch

    def run() -> int:
        for _ in range(steps):
            built.run()
        return steps * batch

    return _best_rate(run)


def decoder_limits(root: Path, size: int, count: int = 300) -> dict[str, Any]:
    """images/s of each decode alone, one thread, on `count` of the training files."""
    cfg = load_config(REPO / "configs" / "default.yaml", [
        "data.name=imagefolder", f"data.root={root}", "data.augment=imagenet"]).data
    files, _ = scan(cfg)
    paths = [files.paths[i] for i in range(min(count, len(files)))]
    blobs = [Path(p).read_bytes() for p in paths]
    augment = Augment(cfg, size, 0)
    out: dict[str, Any] = {"files": len(paths), "full_per_s": None, "scaled_per_s": None,
                           "roi_per_s": None, "dali_full_per_s": None}
    if jpeg.available():
        import simplejpeg

        def full() -> int:
            for blob in blobs:
                simplejpeg.decode_jpeg(blob, "RGB")
            return len(blobs)

        def scaled() -> int:
            for i, blob in enumerate(blobs):
                jpeg.decode(blob, lambda w, h, i=i: augment.train_view(w, h, 0, i))
            return len(blobs)

        out["full_per_s"], out["scaled_per_s"] = _best_rate(full), _best_rate(scaled)
    if importlib.util.find_spec("nvidia.dali") is not None:
        out["roi_per_s"] = _dali_rate(paths, roi=True)
        out["dali_full_per_s"] = _dali_rate(paths, roi=False)
    # The limit: the crop-window decode, at libjpeg-turbo's own rate. DALI's decoder carries
    # its pipeline's overhead, so its ROI / full ratio scales simplejpeg's full-size rate (the
    # higher of that and DALI's own figure: the harder goal).
    found = [r for r in (out["roi_per_s"], out["scaled_per_s"]) if r]
    if out["roi_per_s"] and out["full_per_s"]:
        found.append(out["full_per_s"] * out["roi_per_s"] / out["dali_full_per_s"])
    out["limit_per_s"] = max(found) if found else None
    return out
