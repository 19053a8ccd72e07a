"""`data.val_fraction`: a validation set split off an image folder's train/ when it has no val/.

Each class is split on its own (stratified): its files in sorted order, permuted by a generator
seeded with (`seed`, the class name's CRC32), the first `round(n x fraction)` of them (at least
one) go to validation. A class's split thus depends on its own files and the seed alone, not on
the other classes. The split is recorded in the run folder (`val_split.json`: the validation
files relative to train/), so that a resumed run and `make eval` use the same one even if
files were added since; a recorded split is used only when its fraction and seed are the
run's (else it is another run's, and the split is computed again).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import UserError
from common.files import atomic_write
from common.schema import DataConfig
from train.data.imagefolder import FileSet, PathList, scan, scan_split

SPLIT_VERSION = 1


def scan_folder(cfg: DataConfig, seed: int, recorded: Path | None = None
                ) -> tuple[FileSet, FileSet]:
    """(train, val) of `data.root`: its val/ folder, or with `data.val_fraction` a split of
    train/ (the one recorded in `recorded` when there is one of this run)."""
    if not cfg.val_fraction:
        return scan(cfg)
    root = Path(cfg.root)
    val = root / cfg.imagefolder.val
    if val.exists():
        raise UserError(f"data.val_fraction={cfg.val_fraction:g} splits validation images off "
                        f"{root / cfg.imagefolder.train}, but {val} exists; set "
                        f"data.val_fraction=0 to evaluate on {val}, or move it away")
    if not root.is_dir():
        raise UserError(f"data.root {root} is not a folder; data.name=imagefolder with "
                        f"data.val_fraction reads {root}/{cfg.imagefolder.train}/<class>/*.jpg")
    train = scan_split(root / cfg.imagefolder.train, "data.imagefolder.train")
    return split_train(train, cfg.val_fraction, seed, recorded)


def class_split(names: list[str], class_name: str, fraction: float, seed: int) -> list[int]:
    """Indices (into the sorted `names` of one class) that go to validation."""
    n = len(names)
    take = max(1, round(n * fraction))
    if take >= n:
        raise UserError(f"class {class_name!r} has {n} image{'s' if n != 1 else ''}: "
                        f"data.val_fraction={fraction:g} leaves none for training; each class "
                        f"needs at least 2 images (one to train, one to validate), or a smaller "
                        f"data.val_fraction")
    rng = np.random.default_rng([seed, zlib.crc32(class_name.encode())])
    return sorted(rng.permutation(n)[:take].tolist())


def split_train(train: FileSet, fraction: float, seed: int,
                recorded: Path | None = None) -> tuple[FileSet, FileSet]:
    """(train, val) of one scanned train/ folder: the split recorded in `recorded` when it is
    this run's, else computed from the seed."""
    names = [relative(train, i) for i in range(len(train))]
    held = read_split(recorded, fraction, seed)
    if held is None:
        held = set()
        labels = train.labels.tolist()
        for label, name in enumerate(train.classes):
            mine = [i for i, c in enumerate(labels) if c == label]
            held.update(names[mine[i]] for i in class_split([names[j] for j in mine], name,
                                                            fraction, seed))
    else:
        missing = sorted(held - set(names))
        if missing:
            raise UserError(f"{recorded} lists {len(missing)} validation file(s) that are no "
                            f"longer in {train.folder} (first: {missing[0]}); restore them, or "
                            f"start a new run (run.dir) to split the folder as it is now")
    is_val = [name in held for name in names]
    return subset(train, [not v for v in is_val]), subset(train, is_val)


def relative(files: FileSet, index: int) -> str:
    """A file's name relative to its split folder: `<class>/<file>`."""
    return Path(files.paths[index]).relative_to(files.folder).as_posix()


def subset(files: FileSet, keep: list[bool]) -> FileSet:
    """The files marked in `keep`; its digest tells a decoded cache of one part from another's."""
    chosen = [i for i, k in enumerate(keep) if k]
    paths = [files.paths[i] for i in chosen]
    digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]
    return FileSet(files.folder, PathList(paths),
                   files.labels[torch.tensor(chosen, dtype=torch.long)], files.classes,
                   subset=digest)


def read_split(path: Path | None, fraction: float, seed: int) -> set[str] | None:
    """The validation files a run recorded, or None when there is no record of this split."""
    if path is None or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{path} cannot be read as a validation split; restore it, or remove "
                        f"it to split the folder again from data.val_fraction and seed") from None
    if record.get("val_fraction") != fraction or record.get("seed") != seed:
        return None  # another run's (run.overwrite replaces it): computed again
    return set(record["val"])


def write_split(path: Path, val: FileSet, fraction: float, seed: int) -> None:
    """Record the validation files (the main worker, at the run's start)."""
    record: dict[str, Any] = {"version": SPLIT_VERSION, "val_fraction": fraction, "seed": seed,
                              "train_folder": str(val.folder), "count": len(val),
                              "val": sorted(relative(val, i) for i in range(len(val)))}
    atomic_write(path, lambda p: p.write_text(json.dumps(record, indent=1) + "\n"))
