"""The data benchmark at ImageNet's scale: loader throughput per loader core on photographs
(tools/bench/photos.py), ours against the torchvision recipe, torchvision.io on tensors and
DALI's CPU pipeline, beside libjpeg-turbo's own decode rate (the limit), at 224 and 176 px.

Per loader core: every loader runs in this one process on one thread (DataLoaders without
loader processes, DALI with one thread), so each figure is one core's work, untouched by how
many other cores a loaded machine lends it; handing batches between processes is left out
(the synthetic part, tools/bench/data.py, runs loader processes). Each makes model-ready
batches of 64 (RandomResizedCrop, flip, normalized floats; ours normalizes on the device,
here this same core). Rounds interleave the loaders, so that load on a shared machine hits
all alike; the first round (warm-up, the cache's fill) is reported apart.

    python -m tools.bench.photo_report [--photos 1000] [--rounds 3] [--sizes 224,176]
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tools.bench import data
from tools.bench.limits import decoder_limits
from tools.bench.photos import photo_set
from tools.bench.profile import cache_storage, stream_stages

GPU_RATE = 3000  # images/s ResNet-50 trains at in bf16 on one H100 (issue 26)
TORCHVISION = "torchvision recipe (ImageFolder, PIL, transforms.v2, DataLoader)"
OURS = "ours: stream path (data.decoder=auto: simplejpeg)"
OURS_PIL = "ours: stream path, data.decoder=pil"
OURS_LOADER = "ours: stream path, the loader core's part (uint8 batches: the GPU normalizes)"
CACHE = "ours: decoded cache, later epochs (data.cache=decoded; its device part on this CPU)"
CACHE_CPU = "ours: decoded cache, later epochs, its CPU part on a GPU node (gather from the file)"
TVIO = "torchvision.io decode_jpeg on tensors, transforms.v2, DataLoader"
DALI = "DALI CPU pipeline (ROI decode, resize, flip, normalize)"
FFCV = "FFCV"


def _tensor_loader(path: str) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    with data._quiet():
        return decode_jpeg(read_file(path), mode=ImageReadMode.RGB)


def tvio_recipe(root: Path, size: int, workers: int) -> Any:
    """torchvision's recipe with torchvision.io decoding and the v2 ops on uint8 tensors."""
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import v2

    recipe = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                         v2.ToDtype(torch.float32, scale=True),
                         v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    dataset = datasets.ImageFolder(str(root / "train"), transform=recipe, loader=_tensor_loader)
    return DataLoader(dataset, batch_size=data.BATCH, shuffle=True, num_workers=workers,
                      drop_last=True)


class DaliEpochs:
    """DALI's CPU pipeline as an iterable of epochs: file reader, libjpeg-turbo decoding of the
    RandomResizedCrop window only (its ROI decode), resize, flip, normalize; one thread."""

    def __init__(self, root: Path, size: int, files: int):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=data.BATCH, num_threads=1, device_id=None, seed=0)
        def pipe() -> Any:
            jpegs, labels = fn.readers.file(file_root=str(root / "train"), random_shuffle=True)
            images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB)
            images = fn.resize(images, resize_x=size, resize_y=size)
            images = fn.crop_mirror_normalize(
                images, dtype=types.FLOAT, output_layout="CHW",
                mean=[0.485 * 255, 0.456 * 255, 0.406 * 255],
                std=[0.229 * 255, 0.224 * 255, 0.225 * 255], mirror=fn.random.coin_flip())
            return images, labels

        self.pipe, self.batches = pipe(), files // data.BATCH
        self.pipe.build()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.batches):
            images, labels = self.pipe.run()
            yield (torch.from_numpy(np.asarray(images.as_tensor())),
                   torch.from_numpy(np.asarray(labels.as_tensor())))


def _uint8(batches: Any) -> Any:
    """Our stream path without its device part: the uint8 batches a loader process hands over
    (on a GPU node normalization and the memory format are the GPU's work, not a core's)."""
    batches.finish = lambda raw, epoch: (raw[0], raw[1])
    return batches


def loaders(root: Path, cache_dir: Path, size: int, files: int) -> dict[str, Any]:
    """name -> an iterable of epochs, or a string: why it could not be measured."""
    out: dict[str, Any] = {
        TORCHVISION: data.torchvision_recipe(root, size, 0),
        OURS: data.ours(root, cache_dir, size, 0, "none", data.BATCH, "data.decoder=auto"),
        OURS_PIL: data.ours(root, cache_dir, size, 0, "none", data.BATCH, "data.decoder=pil"),
        OURS_LOADER: _uint8(data.ours(root, cache_dir, size, 0, "none", data.BATCH,
                                      "data.decoder=auto")),
        CACHE: data.ours(root, cache_dir, size, 0, "decoded", data.BATCH, "data.decoder=auto"),
        TVIO: tvio_recipe(root, size, 0)}
    if importlib.util.find_spec("nvidia.dali") is None:
        out[DALI] = "not installed (pip install nvidia-dali-cuda120)"
    else:
        try:
            out[DALI] = DaliEpochs(root, size, files)
        except RuntimeError as exc:  # DALI builds without a GPU, but say why if it does not
            out[DALI] = f"could not build its CPU pipeline: {str(exc).splitlines()[0][:120]}"
    out[FFCV] = ("does not install here: its build needs OpenCV and libjpeg-turbo's headers "
                 "found by pkg-config (no wheel on PyPI)")
    return out


def _epochs(root: Path, all_sizes: dict[int, dict[str, Any]], rounds: int,
            limit_files: int) -> tuple[dict[int, dict[str, list]], dict[int, list], dict]:
    """images/s of each loader per round; our stream path's stages and the decoder's limits
    per round too, between the loaders' epochs, so that they meet the same load."""
    rates: dict[int, dict[str, list[float]]] = {
        size: {n: [] for n, p in found.items() if not isinstance(p, str)}
        for size, found in all_sizes.items()}
    stages: dict[int, list[dict[str, float]]] = {size: [] for size in all_sizes}
    limits: dict[int, list[dict[str, Any]]] = {size: [] for size in all_sizes}
    for r in range(rounds):
        for size, found in all_sizes.items():
            for name in rates[size]:
                batches = found[name]
                if hasattr(batches, "set_epoch"):
                    batches.set_epoch(r)
                rates[size][name].append(data._epoch(batches))
                if name == OURS:
                    stages[size].append(stream_stages(root, size))
            limits[size].append(decoder_limits(root, size, limit_files))
            print(f"bench: photos round {r + 1}/{rounds} at {size} px: " + ", ".join(
                f"{n.split(' (')[0]} {v[-1]:,.0f}" for n, v in rates[size].items()), flush=True)
    return rates, stages, limits


def _medians(found: list[dict[str, Any]]) -> dict[str, Any]:
    """Per key, the median over the rounds after the first (None where never measured)."""
    kept = found[1:] or found
    return {k: statistics.median(f[k] for f in kept) if kept[0][k] is not None else None
            for k in kept[0]}


def measure(photos: int = 1000, rounds: int = 3, sizes: Iterable[int] = (224, 176),
            limit_files: int = 300) -> dict[str, Any]:
    """The table: images/s per loader core, ratios to the torchvision recipe and to the
    decoder's limit, loader cores per GPU at GPU_RATE."""
    root = photo_set(photos)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            found = {size: loaders(root, Path(tmp) / f"cache-{size}", size, photos)
                     for size in sizes}
            rates, stages, limits = _epochs(root, found, rounds, limit_files)
            storage = {size: cache_storage(root, size) for size in sizes}
    finally:
        torch.set_num_threads(threads)
    report: dict[str, Any] = {"photos": photos, "root": str(root), "rounds": rounds,
                              "batch": data.BATCH, "gpu_rate": GPU_RATE, "sizes": {}}
    for size in sizes:
        med = {n: statistics.median(r[1:] or r) for n, r in rates[size].items()}
        med[CACHE_CPU] = storage[size]["gather_per_s"]
        profile = _medians(stages[size])
        report["sizes"][size] = {
            "images_per_s": med, "raw": rates[size], "limits": _medians(limits[size]),
            "skipped": {n: p for n, p in found[size].items() if isinstance(p, str)},
            "cache_first_epoch": rates[size][CACHE][0], "stages": profile,
            "cache_storage": storage[size]}
    return report


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals at 224 px, each a ratio from this run: per loader core (our uint8
    batches, the GPU normalizes), and with our normalization on the same core as on a CPU."""
    at = report["sizes"].get(224) or next(iter(report["sizes"].values()))
    med, limit = at["images_per_s"], at["limits"]["limit_per_s"]
    core, whole, tv = med[OURS_LOADER], med[OURS], med[TORCHVISION]
    rows = [("loader core, 224 px photos: stream path / torchvision recipe", core / tv, 2),
            ("one core, 224 px photos, normalizing on it too: stream path / torchvision recipe",
             whole / tv, 2),
            ("loader core, 224 px photos: decoded cache's later epochs (CPU part) / stream "
             "path", med[CACHE_CPU] / core, 2)]
    if limit:
        rows.append(("loader core, 224 px photos: stream path / libjpeg-turbo's crop-window "
                     "decode alone (the limit)", core / limit, 0.8))
    return [{"target": t, "value": v, "goal": f">= {g}", "met": v >= g} for t, v, g in rows]
