"""The photographic data benchmark's report (tools/bench/loaders.py measures it): the table of
loaders and limits per size, the profile of our stream path, the decoded cache's storage.

    python -m tools.bench.photo_report [--photos 1000] [--rounds 3] [--sizes 224,176]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tools.bench.loaders import OURS, TORCHVISION, measure
from tools.bench.profile import describe

LIMIT_ROWS = (
    ("limit_per_s", "**the limit**: libjpeg-turbo, the crop window only, at its own rate"),
    ("roi_per_s", "libjpeg-turbo, the crop window only (DALI's decoder)"),
    ("scaled_per_s", "libjpeg-turbo, whole image at the view's DCT scale (simplejpeg)"),
    ("full_per_s", "libjpeg-turbo, whole image, full size (simplejpeg)"),
    ("dali_full_per_s", "libjpeg-turbo, whole image, full size (DALI's decoder)"))


def table(report: dict[str, Any]) -> list[str]:
    """The photographic part of the report, in markdown."""
    gpu = report["gpu_rate"]
    lines = ["", f"## Data at ImageNet's scale: {report['photos']} photographs (mean about "
             f"400 x 350, quality 85-95), one core each (no loader processes), batch "
             f"{report['batch']}", "",
             "Model-ready batches (RandomResizedCrop, flip, normalized); medians of rounds "
             f"2-{report['rounds']}, rounds interleaved. Cores per GPU: loader cores to feed "
             f"ResNet-50 bf16 at {gpu:,} images/s.", ""]
    for size, at in report["sizes"].items():
        med, lim = at["images_per_s"], at["limits"]
        tv, roi = med[TORCHVISION], lim["limit_per_s"]
        lines += [f"### {size} px", "", "| pipeline | images/s per core | vs torchvision | "
                  "of the limit | cores per GPU |", "|---|---|---|---|---|"]
        for name, rate in med.items():
            share = f"{rate / roi:.2f}" if roi else "-"
            lines.append(f"| {name} | {rate:,.0f} | {rate / tv:.2f}x | {share} | "
                         f"{gpu / rate:.1f} |")
        lines += [f"| {name} | not measured: {why} | | | |" for name, why in at["skipped"].items()]
        for key, label in LIMIT_ROWS:
            if lim[key]:
                share = f"{lim[key] / roi:.2f}" if roi else "-"
                lines.append(f"| {label}, decode alone | {lim[key]:,.0f} | "
                             f"{lim[key] / tv:.2f}x | {share} | {gpu / lim[key]:.1f} |")
        lines += ["", f"The cache's first epoch (decoding into it): "
                  f"{at['cache_first_epoch']:,.0f} images/s.", ""] + _bounds(size, at)
    return lines


def _bounds(size: int, at: dict[str, Any]) -> list[str]:
    c = at["cache_storage"]
    lines = [f"Where our stream path spends a sample's time on its core at {size} px "
             f"(stages measured in one process on the same files):", "",
             "| stage | ms per sample | share |", "|---|---|---|",
             *describe(at["stages"], at["images_per_s"][OURS]), "",
             f"The decoded cache at {size} px stores {c['stored_side']} px squares: "
             f"{c['raw_bytes'] / 1e3:.0f} kB per image raw, {c['raw_gb_per_million']:.0f} GB "
             f"per million images; re-encoded as JPEG (quality 90) "
             f"{c['jpeg_q90_bytes'] / 1e3:.1f} kB, {c['jpeg_gb_per_million']:.0f} GB per "
             f"million, decoding at {c['jpeg_decode_per_s']:,.0f} images/s per core (the "
             f"source files: {c['source_bytes'] / 1e3:.0f} kB). Its CPU part on a GPU node, "
             f"gathering random batches from the file: {c['gather_per_s']:,.0f} images/s "
             f"per core (from the page cache).", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.photo_report",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=1000, help="training photographs")
    parser.add_argument("--rounds", type=int, default=3, help="the first is a warm-up")
    parser.add_argument("--sizes", default="224,176", help="training resolutions, pixels")
    args = parser.parse_args(argv)
    report = measure(args.photos, args.rounds, [int(s) for s in args.sizes.split(",")])
    print(json.dumps(report, indent=2, default=str))
    print("\n".join(table(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
