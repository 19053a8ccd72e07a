"""Framework overhead: `make train`'s LeNet epoch throughput against a minimal DDP loop.

Both run the same data, model, workers, global batch and thread settings, alternating
(ours, minimal, ours, minimal, ...) so that load on this shared machine hits both alike.
The first epoch of every run is a warm-up and not counted. Prints the ratio; target: <= 3%.

    python -m tools.bench.overhead [--rounds 3] [--epochs 4] [--workers 2] [--out reports/overhead]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def ours_records(workers: int, epochs: int, train_samples: int,
                 *extra: str) -> list[dict[str, Any]]:
    """The metrics.jsonl records of a `python -m launch` run (what `make train` runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "launch", "--cpu", "--gpus", str(workers),
                        str(REPO / "configs" / "default.yaml"), f"run.dir={tmp}/run",
                        f"train.epochs={epochs}", f"data.synthetic.train_samples={train_samples}",
                        "data.synthetic.test_samples=1000", "wandb.mode=disabled", *extra],
                       cwd=REPO, check=True, capture_output=True, text=True)
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def minimal(workers: int, epochs: int, train_samples: int) -> list[float]:
    # The launcher's monitor interval: torchrun's default (0.1 s) wakes the agent 5x as often.
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--monitor-interval=0.5",
                          f"--nproc-per-node={workers}", "-m", "tools.bench.minimal_ddp",
                          f"--epochs={epochs}", f"--train-samples={train_samples}"],
                         cwd=REPO, check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    return [json.loads(line)["samples_per_s"] for line in out.stdout.splitlines()
            if line.startswith("{")]


def whole_epoch_samples_per_s(record: dict[str, Any]) -> float:
    """An epoch's samples/s counting the DDP sync probe that follows its steps (null, or
    absent in older records, where it did not run)."""
    return record["samples_per_s"] * record["epoch_time_s"] / (
        record["epoch_time_s"] + (record.get("probe_time_s") or 0.0))


def measure(rounds: int, epochs: int, workers: int, samples: int) -> dict[str, Any]:
    """Alternate the two; the median samples/s of each over all counted epochs."""
    figures: dict[str, list[float]] = {"ours": [], "minimal": [], "ours_whole_epoch": []}
    for r in range(rounds):
        for name, fn in (("ours", ours_records), ("minimal", minimal)):
            epochs_after_warmup = fn(workers, epochs, samples)[1:]
            if name == "ours":
                # The whole epoch also pays for the DDP sync probe run after its steps.
                figures["ours_whole_epoch"].extend(
                    whole_epoch_samples_per_s(r) for r in epochs_after_warmup)
                epochs_after_warmup = [r["samples_per_s"] for r in epochs_after_warmup]
            figures[name].extend(epochs_after_warmup)
            print(f"overhead round {r + 1}/{rounds} {name:8s} " +
                  " ".join(f"{x:,.0f}" for x in epochs_after_warmup) + " samples/s", flush=True)
    med = {name: statistics.median(values) for name, values in figures.items()}
    ratio = med["ours"] / med["minimal"]  # step throughput, as the minimal loop has no probe
    return {"workers": workers, "global_batch": 256, "median_samples_per_s": med,
            "ratio_ours_over_minimal": ratio, "overhead_percent": (1 - ratio) * 100,
            "epochs_counted": {k: len(v) for k, v in figures.items()}, "raw": figures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4, help="per run; the first is warm-up")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--train-samples", type=int, default=24_000)
    parser.add_argument("--out", default=str(REPO / "reports" / "overhead"))
    args = parser.parse_args(argv)
    result = measure(args.rounds, args.epochs, args.workers, args.train_samples)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    med, ratio = result["median_samples_per_s"], result["ratio_ours_over_minimal"]
    print(f"\nmake train: {med['ours']:,.0f} samples/s   minimal DDP loop: "
          f"{med['minimal']:,.0f} samples/s   ratio {ratio:.3f}  "
          f"(overhead {(1 - ratio) * 100:+.1f}%; target <= 3%)")
    print(f"written: {out / 'overhead.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
