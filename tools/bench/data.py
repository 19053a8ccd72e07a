"""The data benchmark: our stream path and decoded cache against the plain torchvision recipe,
the decoders, and how long ResNet-18 waits for data, all on JPEG folders written here.

Every figure is a ratio of paths measured in this run on the same files and cores, epochs
interleaved (torchvision, stream, cache, torchvision, ...) so that load on a shared machine hits
all alike. No model in the throughput part: images/s of normalized float batches of the
`imagenet` recipe (RandomResizedCrop to `--size`, flip) ready for the model.

    python -m tools.bench.data [--train 2000] [--size 64] [--workers 2] [--epochs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from models import build_model
from tools.make_images import write_image_folder
from train.config import load_config
from train.data.augment import Augment
from train.data.build import build_data
from train.data.decode import render_path, render_pil
from train.data.imagefolder import scan
from train.dist import DistContext

REPO = Path(__file__).resolve().parents[2]
BATCH = 64
PIL_OURS = "pil (reduced-size decoding: ours, data.decoder=pil)"
FAST_OURS = "simplejpeg (reduced-size decoding: ours, data.decoder=auto)"
WAIT_BATCH = 8  # ResNet-18 steps: a 64-image step takes about a minute on 2 CPU cores


def _cfg(root: Path, cache_dir: Path, size: int, workers: int, *extra: str) -> Any:
    return load_config(REPO / "configs" / "default.yaml", [
        "data.name=imagefolder", f"data.root={root}", f"data.image_size={size}",
        "data.augment=imagenet", "data.loader=stream", f"data.num_workers={workers}",
        f"data.cache_dir={cache_dir}", "data.stats_samples=200", *extra]).data


def ours(root: Path, cache_dir: Path, size: int, workers: int, cache: str,
         batch: int = BATCH, *extra: str) -> Any:
    """This tool's training batches (one worker on the CPU), as `make train` builds them."""
    ctx = DistContext(0, 0, 1, 1, torch.device("cpu"), "none", 1)
    cfg = _cfg(root, cache_dir, size, workers, f"data.cache={cache}", *extra)
    return build_data(cfg, 0, ctx, batch, batch, channels_last=True).train


def torchvision_recipe(root: Path, size: int, workers: int) -> Any:
    """What the torchvision reference scripts do: ImageFolder, PIL, transforms.v2 on each PIL
    image, a DataLoader with its defaults (shuffle, the same number of workers)."""
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import v2

    recipe = v2.Compose([v2.RandomResizedCrop(size), v2.RandomHorizontalFlip(),
                         v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                         v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    dataset = datasets.ImageFolder(str(root / "train"), transform=recipe)
    return DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers,
                      drop_last=True)


def _epoch(batches: Iterable[Any]) -> float:
    """images/s of one pass, the batches consumed as a training loop would (no model)."""
    start, count = time.perf_counter(), 0
    for images, _ in batches:
        count += images.shape[0]
    return count / (time.perf_counter() - start)


def throughput(root: Path, cache_dir: Path, size: int, workers: int,
               epochs: int) -> dict[str, Any]:
    """images/s per path, medians of the epochs after the first (the cache's first epoch
    decodes into the cache: reported apart)."""
    paths: dict[str, Any] = {"torchvision": torchvision_recipe(root, size, workers),
                             "stream": ours(root, cache_dir, size, workers, "none"),
                             "cache": ours(root, cache_dir, size, workers, "decoded")}
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for epoch in range(epochs):
        for name, batches in paths.items():
            if hasattr(batches, "set_epoch"):
                batches.set_epoch(epoch)
            rates[name].append(_epoch(batches))
        print(f"bench: data epoch {epoch + 1}/{epochs}: " + ", ".join(
            f"{name} {r[-1]:,.0f}" for name, r in rates.items()) + " images/s", flush=True)
    med = {name: statistics.median(r[1:] or r) for name, r in rates.items()}
    return {"images_per_s": med, "raw": rates, "cache_first_epoch": rates["cache"][0],
            "stream_over_torchvision": med["stream"] / med["torchvision"],
            "cache_over_stream": med["cache"] / med["stream"]}


def _decoders(size: int) -> dict[str, Callable[[str, Any], torch.Tensor] | str]:
    """path, view -> uint8 [3, size, size]: each decoder with the same crop, resize and flip."""
    import torchvision.transforms.v2.functional as TF
    from PIL import Image

    def crop(image: torch.Tensor, v: Any) -> torch.Tensor:
        out = TF.resized_crop(image, round(v.top), round(v.left), round(v.height),
                              round(v.width), [v.size, v.size], antialias=True)
        return out.flip(-1) if v.flip else out

    def pil_full(path: str, v: Any) -> torch.Tensor:
        return render_pil(Image.open(path).convert("RGB"), v)

    def torchvision_io(path: str, v: Any) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

        with _quiet():
            return crop(decode_jpeg(read_file(path), mode=ImageReadMode.RGB), v)

    out: dict[str, Any] = {FAST_OURS: lambda path, v: render_path(path, lambda w, h: v,
                                                                  "simplejpeg"),
                           PIL_OURS: lambda path, v: render_path(path, lambda w, h: v, "pil"),
                           "pil (full size)": pil_full, "torchvision.io": torchvision_io}
    if importlib.util.find_spec("torchcodec") is None:
        out["torchcodec"] = "not installed"
    else:
        def torchcodec(path: str, v: Any) -> torch.Tensor:
            from torchcodec.decoders import decode_jpeg

            return crop(decode_jpeg(path), v)

        out["torchcodec"] = torchcodec
    out["nvjpeg"] = ("runs on GPUs only (no GPU here)" if not torch.cuda.is_available()
                     else "batches on the GPU: see data.decoder=nvjpeg runs")
    return out


@contextlib.contextmanager
def _quiet() -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29's deprecation of its decoders
        yield


def decoders(root: Path, size: int, count: int = 300) -> dict[str, Any]:
    """ms per training sample (decode, crop, resize, flip) of each decoder, one process, the
    same files and views; rounds interleaved, the best round counted."""
    cfg = load_config(REPO / "configs" / "default.yaml", [
        "data.name=imagefolder", f"data.root={root}", "data.augment=imagenet"]).data
    files, _ = scan(cfg)
    augment = Augment(cfg, size, 0)
    from PIL import Image

    picks = [files.paths[i] for i in range(min(count, len(files)))]
    views = [augment.train_view(*Image.open(p).size, 0, i) for i, p in enumerate(picks)]
    found, times = _decoders(size), {}
    runnable = {k: f for k, f in found.items() if callable(f)}
    for _ in range(3):
        for name, fn in runnable.items():
            start = time.perf_counter()
            for path, view in zip(picks, views, strict=True):
                fn(path, view)
            ms = 1000 * (time.perf_counter() - start) / len(picks)
            times[name] = min(times.get(name, ms), ms)
    fastest = min(times, key=times.get)
    return {"ms_per_sample": times, "fastest": fastest,
            "skipped": {k: f for k, f in found.items() if not callable(f)}}


def data_wait(root: Path, cache_dir: Path, size: int, workers: int,
              steps: int) -> dict[str, Any]:
    """Share of ResNet-18's step time (64 px, SGD) spent waiting for the next batch, per path:
    an epoch without the model first (the cache fills), then `steps` steps timed."""
    out = {}
    for path, cache in (("stream", "none"), ("cache", "decoded")):
        batches = ours(root, cache_dir, size, workers, cache, WAIT_BATCH)
        batches.set_epoch(0)
        _epoch(batches)
        torch.manual_seed(0)
        model = build_model("resnet18", 3, 10, size).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        batches.set_epoch(1)
        waited = stepped = 0.0
        it, timed = iter(batches), min(steps, len(batches)) - 1
        for step in range(timed + 1):
            start = time.perf_counter()
            images, labels = next(it)
            ready = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done = time.perf_counter()
            if step:  # the first step pays for the model's first forward
                waited, stepped = waited + ready - start, stepped + done - start
        out[path] = {"wait_share": waited / stepped, "step_s": stepped / timed}
        print(f"bench: ResNet-18 {path}: data wait {waited / stepped:.1%} of "
              f"{stepped / timed:.2f} s steps", flush=True)
        del it
    return out


def measure(train: int = 2000, size: int = 64, workers: int = 2, epochs: int = 3,
            steps: int = 5) -> dict[str, Any]:
    """The whole data benchmark in a temporary folder (its JPEGs, its caches). The training
    process keeps one intra-op thread, as a worker of a CPU run whose other cores go to loader
    processes (more threads than free cores stall each op at its barriers on a loaded box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(train, size, workers, epochs, steps)
    finally:
        torch.set_num_threads(threads)


def _measure(train: int, size: int, workers: int, epochs: int, steps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = write_image_folder(Path(tmp) / "images", train, 100, classes=10, min_size=64,
                                  max_size=160)
        print(f"bench: wrote {train} JPEGs of 64-160 px", flush=True)
        report = {"train_images": train, "size": size, "workers": workers, "batch": BATCH,
                  "wait_batch": WAIT_BATCH, "decoders": decoders(root, size)}
        print("bench: decoders " + ", ".join(f"{k} {v:.2f} ms" for k, v in
                                             report["decoders"]["ms_per_sample"].items()),
              flush=True)
        report["throughput"] = throughput(root, Path(tmp) / "cache", size, workers, epochs)
        report["wait"] = data_wait(root, Path(tmp) / "cache-wait", size, workers, steps)
    return report


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's data targets, each a ratio from this run."""
    t, wait = report["throughput"], report["wait"]["cache"]["wait_share"]
    dec = report["decoders"]
    best, ours = min(dec["ms_per_sample"].values()), dec["ms_per_sample"][FAST_OURS]
    return [
        {"target": "64 px synthetic loader: stream path / torchvision recipe (images/s)",
         "value": t["stream_over_torchvision"], "goal": ">= 1.5",
         "met": t["stream_over_torchvision"] >= 1.5},
        {"target": "64 px synthetic loader: decoded cache, later epochs / stream path",
         "value": t["cache_over_stream"], "goal": ">= 3", "met": t["cache_over_stream"] >= 3},
        {"target": "ResNet-18 64 px, 2 loader processes: data wait with the cache (% of step)",
         "value": 100 * wait, "goal": "<= 5 %", "met": wait <= 0.05},
        {"target": f"64 px synthetic: the default decoder (simplejpeg) within 10% of the "
                   f"fastest ({dec['fastest']})",
         "value": ours / best, "goal": "<= 1.1", "met": ours / best <= 1.1}]

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2000, help="training JPEGs to write")
    parser.add_argument("--size", type=int, default=64, help="training resolution, pixels")
    parser.add_argument("--workers", type=int, default=2, help="loader processes, each path")
    parser.add_argument("--epochs", type=int, default=3, help="the first is a warm-up")
    parser.add_argument("--steps", type=int, default=5, help="ResNet-18 steps timed per path")
    args = parser.parse_args(argv)
    report = measure(args.train, args.size, args.workers, args.epochs, args.steps)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
