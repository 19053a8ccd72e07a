"""The photographic benchmark set: JPEGs at ImageNet's size distribution cut from real
photographs, written once into a cache folder and reused by every later benchmark run.

The photographs are scikit-image's sample images (shipped inside its wheel, `skimage.data`):
astronaut (NASA, Eileen Collins), chelsea (the cat, Stefan van der Walt), coffee (Rachel
Michetti), hubble_deep_field (NASA/ESA), ihc (immunohistochemistry slide), stereo_motorcycle (both
views, Middlebury stereo set), retina (Häggström) and rocket (SpaceX launch). Each
file is a random box of one of them (a quarter to all of its area, maybe mirrored), scaled to
a size drawn from ImageNet's distribution (most files 500 px on the long side, 4:3, a quarter
portrait; mean about 400 x 350) and saved as a baseline JPEG at quality 85-95 (4:2:0),
as most of ImageNet's files are. Synthetic images (tools/make_images.py) decode faster than
photographs: smooth areas leave few DCT coefficients to decode.

    python -m tools.bench.photos [--train 3000] [--folder DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SOURCES = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry",
           "retina", "rocket", "stereo_motorcycle")
CLASSES = 10
VERSION = 1  # part of the folder's name: a change to how files are made writes a new set


def default_root() -> Path:
    """Where sets are kept between runs: $DPTRAIN_BENCH_CACHE, else ~/.cache/dptrain."""
    env = os.environ.get("DPTRAIN_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dptrain"


def imagenet_size(rng: random.Random) -> tuple[int, int]:
    """(width, height) as ImageNet's training files come: the long side 500 px in most,
    smaller in the rest; mostly 4:3 or 3:2, some square; a quarter portrait."""
    long_side = 500 if rng.random() < 0.55 else rng.randint(200, 500)
    pick = rng.random()
    aspect = 0.75 if pick < 0.5 else 2 / 3 if pick < 0.7 else 1.0 if pick < 0.8 else \
        rng.uniform(0.5, 1.0)
    short_side = max(64, round(long_side * aspect))
    return (short_side, long_side) if rng.random() < 0.25 else (long_side, short_side)


def _sources() -> list[np.ndarray]:
    import skimage.data

    photos = []
    for name in SOURCES:
        found = getattr(skimage.data, name)()
        photos += list(found[:2]) if name == "stereo_motorcycle" else [found]  # left, right
    return [np.ascontiguousarray(np.asarray(p)[..., :3]) for p in photos]


def _cut(photo: np.ndarray, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A random box of `photo` with the target's aspect, a quarter to all of its area."""
    height, width = photo.shape[:2]
    aspect = size[0] / size[1]
    area = width * height * rng.uniform(0.25, 1.0)
    w = min(width, round((area * aspect) ** 0.5))
    h = min(height, round(w / aspect))
    w = min(w, round(h * aspect))
    left, top = rng.randint(0, width - w), rng.randint(0, height - h)
    image = Image.fromarray(photo[top:top + h, left:left + w])
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image.resize(size, Image.BICUBIC, reducing_gap=3.0)


def write_photos(folder: Path, train: int, val: int, seed: int = 0) -> dict[str, float]:
    """Write folder/train/class_XX/*.jpg and folder/val/...; returns the mean size."""
    rng, photos = random.Random(seed), _sources()
    sizes = []
    for split, count in (("train", train), ("val", val)):
        for c in range(CLASSES):
            (folder / split / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            size = imagenet_size(rng)
            image = _cut(photos[rng.randrange(len(photos))], size, rng)
            image.save(folder / split / f"class_{i % CLASSES:02d}" / f"{i:06d}.jpg",
                       quality=rng.randint(85, 95), subsampling="4:2:0")
            sizes.append(size)
    mean = np.mean(sizes, axis=0)
    return {"files": len(sizes), "mean_width": float(mean[0]), "mean_height": float(mean[1])}


def photo_set(train: int = 3000, val: int = 0, root: Path | None = None) -> Path:
    """The set of `train` (+ `val`) photographs, written on first use (into a temporary
    folder renamed when complete, so an interrupted write is never taken for a set)."""
    val = val or max(CLASSES, train // 10)
    folder = (root or default_root()) / f"photos-v{VERSION}-{train}-{val}"
    if (folder / "train").is_dir():
        return folder
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    stats = write_photos(tmp, train, val)
    print(f"photos: wrote {stats['files']} JPEGs, mean {stats['mean_width']:.0f} x "
          f"{stats['mean_height']:.0f}, into {folder}", flush=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished the same set first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.photos",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--root", type=Path, default=None, help="default: " + str(default_root()))
    args = parser.parse_args(argv)
    print(photo_set(args.train, root=args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
