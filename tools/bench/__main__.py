"""`make bench`: where the time goes, where the memory goes and how we compare, every figure a
ratio measured side by side in this run (the machine is shared and noisy: absolute numbers
drift, ratios much less).

    python -m tools.bench [--out reports/bench] [--rounds 2] [--skip-peers] [--only data,...]

Writes bench.md (tables, targets), bench.png and bench.json into the report folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tools.bench import comm, data, loaders, overhead
from tools.bench.report import figure, markdown

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "default.yaml")
PARTS = ("scaling", "comm", "data", "overhead", "memory", "peers")
PATHS = {"ddp": ["--mode", "ddp"], "scratch ring": ["--mode", "scratch", "scratch.algorithm=ring"],
         "scratch naive": ["--mode", "scratch", "scratch.algorithm=naive"]}


def launch_epochs(workers: int, *extra: str, epochs: int = 3, samples: int = 12_000) -> float:
    """Median samples/s of `python -m launch` epochs after the first (warm-up)."""
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [sys.executable, "-m", "launch", "--cpu", "--gpus", str(workers), CONFIG,
             f"run.dir={tmp}/run", f"train.epochs={epochs}", "wandb.mode=disabled",
             f"data.synthetic.train_samples={samples}", "data.synthetic.test_samples=1000",
             *extra], cwd=REPO, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"launch failed: {done.stderr[-1500:]}")
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
    return statistics.median(json.loads(line)["samples_per_s"] for line in lines[1:])


def scaling(max_workers: int) -> dict[str, Any]:
    """samples/s with 1..n workers of one thread each, per path; speedup and efficiency."""
    counts = list(range(1, max_workers + 1))
    out: dict[str, Any] = {}
    for path, flags in PATHS.items():
        mode = [f"mode={flags[1]}", *flags[2:]]
        speeds = {n: launch_epochs(n, "dist.cpu_threads=1", *mode) for n in counts}
        out[path] = {n: {"samples_per_s": s, "speedup": s / speeds[1],
                         "efficiency": s / speeds[1] / n} for n, s in speeds.items()}
        print(f"bench: scaling {path}: " + ", ".join(
            f"{n} worker(s) {s:,.0f}/s" for n, s in speeds.items()), flush=True)
    return out


def compiled(epochs: int, workers: int, samples: int) -> dict[str, Any]:
    """`make train` with perf.compile=on: whole-epoch samples/s, and the one-off compile time
    (auto compiles only runs of perf.compile_min_steps steps or more)."""
    records = overhead.ours_records(workers, epochs, samples, "perf.compile=on")
    speed = statistics.median(overhead.whole_epoch_samples_per_s(r) for r in records[1:])
    print(f"bench: make train with perf.compile=on: {speed:,.0f} samples/s after "
          f"{records[0]['compile_time_s']:.0f} s of compiling", flush=True)
    return {"samples_per_s": speed, "compile_time_s": records[0]["compile_time_s"]}


def peers(ours_samples_per_s: float, compiled: dict[str, Any], epochs: int = 3,
          samples: int = 24_000) -> dict[str, Any]:
    """The same LeNet epochs in a plain DDP loop, Lightning and Accelerate (when installed)."""
    out: dict[str, Any] = {}
    for name, module in (("plain DDP loop", None), ("lightning", "lightning"),
                         ("accelerate", "accelerate")):
        if module and not _installed(module):
            out[name] = {"skipped": f"{module} is not installed (make peers)"}
            continue
        framework = name.split()[0]
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
             "-m", "tools.bench.peers", framework, f"--epochs={epochs}",
             f"--train-samples={samples}"], cwd=REPO, capture_output=True, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
        lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
        if done.returncode or not lines:
            out[name] = {"skipped": f"failed: {done.stderr.strip().splitlines()[-1:]}"}
            continue
        speed = statistics.median(r["samples_per_s"] for r in lines[1:] or lines)
        out[name] = {"samples_per_s": speed, "our_epoch_time_ratio": speed / ours_samples_per_s,
                     "compiled_epoch_time_ratio": speed / compiled["samples_per_s"]}
        print(f"bench: {name}: {speed:,.0f} samples/s; our epoch takes "
              f"{speed / ours_samples_per_s:.2f}x its time", flush=True)
    return out


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each a ratio from this run."""
    rows = []

    def add(name: str, value: float | None, goal: str, met: bool | None) -> None:
        rows.append({"target": name, "value": value, "goal": goal, "met": met})

    for name, peer in report.get("peers", {}).items():
        ratio = peer.get("our_epoch_time_ratio")
        add(f"default LeNet epoch vs {name} (time ratio)", ratio, "<= 0.75",
            None if ratio is None else ratio <= 0.75)
        ratio = peer.get("compiled_epoch_time_ratio")
        add(f"the same with perf.compile=on vs {name} (time ratio, compile time apart)", ratio,
            "<= 0.75", None if ratio is None else ratio <= 0.75)
    if "overhead" in report:
        ratio = report["overhead"]["ratio_ours_over_minimal"]
        add("framework overhead vs minimal loop, same knobs", (1 - ratio) * 100, "<= 3 %",
            (1 - ratio) * 100 <= 3)
    if "allreduce" in report:
        big = [r for r in report["allreduce"]["rows"] if 16 * 2**20 <= r["bytes"] <= 64 * 2**20]
        ring = min(r["ring"]["algbw_GBps"] / r["torch"]["algbw_GBps"] for r in big)
        add("our ring / gloo all_reduce bandwidth, 16-64 MiB (worst size)", ring, ">= 0.9",
            ring >= 0.9)
    if "resnet_sync" in report:
        sync = report["resnet_sync"]
        bucketed = sync["ring_per_parameter"] / sync["ring_bucketed_25mb"]
        add("ResNet-18 gradients: per-parameter time / bucketed time", bucketed, ">= 3",
            bucketed >= 3)
    if "scaling" in report:
        two = report["scaling"]["ddp"].get(2, {}).get("speedup")
        add("LeNet, 2 workers vs 1 (one thread each)", two, ">= 1.8",
            None if two is None else two >= 1.8)
    if "data_photos" in report:
        rows += loaders.targets(report["data_photos"])
    if "data" in report:
        rows += data.targets(report["data"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "reports" / "bench"))
    parser.add_argument("--rounds", type=int, default=2, help="overhead: alternating rounds")
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts to run, of: {','.join(PARTS)}")
    args = parser.parse_args(argv)
    parts = set(args.only.split(","))
    if parts - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(parts - set(PARTS)))}")
    if "peers" in parts:
        parts.add("overhead")  # the peers are compared with its figure
    started = time.perf_counter()
    cores = len(os.sched_getaffinity(0))
    report: dict[str, Any] = {"cores": cores}
    if "scaling" in parts:
        report["scaling"] = scaling(max(2, min(cores, 4)))
    if "comm" in parts:
        report["allreduce"] = comm.spawn(comm.allreduce_sweep, 2)
        print("bench: allreduce sweep done", flush=True)
        report["resnet_sync"] = comm.spawn(comm.resnet_gradient_sync, 2)
        report["ddp"] = comm.spawn(comm.ddp_buckets_and_overlap, 2)
        print("bench: DDP bucket sweep and overlap done", flush=True)
    if "data" in parts:
        report["data_photos"] = loaders.measure()
        report["data"] = data.measure()
    if "overhead" in parts:
        report["overhead"] = overhead.measure(args.rounds, epochs=3, workers=2, samples=24_000)
    if "peers" in parts and not args.skip_peers:
        report["compiled"] = compiled(epochs=3, workers=2, samples=24_000)
        ours = report["overhead"]["median_samples_per_s"]["ours_whole_epoch"]
        report["peers"] = peers(ours, report["compiled"])
    report["targets"] = targets(report)
    report["seconds"] = time.perf_counter() - started

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")

    (out / "bench.md").write_text(markdown(report))
    if all(key in report for key in ("scaling", "allreduce", "overhead")):
        figure(report, out / "bench.png")
    print("\n" + markdown(report))
    print(f"written: {out / 'bench.md'}, {out / 'bench.png'}, {out / 'bench.json'} "
          f"({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
