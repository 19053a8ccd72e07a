"""Write an image folder in torchvision's ImageFolder layout from the synthetic generator:
JPEG files of random sizes, for trying `data.name=imagefolder` offline, the tests and
`make bench`.

    python -m tools.make_images data/demo [--train 2000] [--val 400] [--classes 10]
        [--min-size 64] [--max-size 160] [--quality 90] [--format jpg|png]

writes data/demo/train/class_00/000000.jpg ... and data/demo/val/... (none with --val 0).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from PIL import Image

from common.schema import SyntheticConfig
from train.data.synthetic import make_synthetic

BASE_SIZE = 48  # pixels the generator draws at; each file is this image resized


def write_image_folder(root: Path, train: int, val: int, classes: int = 10,
                       min_size: int = 64, max_size: int = 160, quality: int = 90,
                       fmt: str = "jpg", seed: int = 0) -> Path:
    """Write `train` and `val` images into root/train and root/val (no val/ when `val` is 0:
    a folder for data.val_fraction); returns `root`."""
    cfg = SyntheticConfig(train_samples=train, test_samples=max(val, 1), channels=3,
                          image_size=BASE_SIZE, num_classes=classes)
    splits = dict(zip(("train", "val"), make_synthetic(cfg, seed), strict=True))
    if not val:
        del splits["val"]
    rng = random.Random(seed)
    for split, data in splits.items():
        for name in range(classes):  # every class folder exists, even when a split is tiny
            (root / split / f"class_{name:02d}").mkdir(parents=True, exist_ok=True)
        for i in range(len(data)):
            size = (rng.randint(min_size, max_size), rng.randint(min_size, max_size))
            image = Image.fromarray(data.images[i].permute(1, 2, 0).numpy())
            image = image.resize(size, Image.BILINEAR)
            path = root / split / f"class_{int(data.labels[i]):02d}" / f"{i:06d}.{fmt}"
            image.save(path, quality=quality) if fmt == "jpg" else image.save(path)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.make_images",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=400)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--min-size", type=int, default=64)
    parser.add_argument("--max-size", type=int, default=160)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg")
    args = parser.parse_args(argv)
    write_image_folder(args.root, args.train, args.val, args.classes, args.min_size,
                       args.max_size, args.quality, args.format)
    print(f"wrote {args.train} train and {args.val} val images in {args.classes} classes "
          f"into {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
