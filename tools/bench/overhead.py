"""Framework overhead: `make train`'s LeNet epoch throughput against a minimal DDP loop.

Both run the same data, model, workers, global batch, thread and allocator settings, measured
two ways:
- paired (the figure against the target, <= 3%): one torchrun job whose workers run epochs
  of our trainer and of the minimal loop in turn (tools/bench/paired.py); the median of the
  pairs' ratios, with its quartiles and a bootstrap 90% interval;
- separate runs, alternating (`python -m launch`, minimal, `python -m launch`, ...), the first
  epoch of each a warm-up: the median of each side's epochs. On this machine, whose speed
  drifts by tens of percent within seconds, these differ by more than the target from one
  round to the next.

    python -m tools.bench.overhead [--rounds 3] [--epochs 4] [--pairs 40] [--out reports/overhead]
"""

from __future__ import annotations

import argparse
import json
import os
import random
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


def torchrun_lines(workers: int, module: str, *args: str) -> list[dict[str, Any]]:
    """The JSON lines that rank 0 of `torchrun -m module args` prints."""
    # The launcher's monitor interval: torchrun's default (0.1 s) wakes the agent 5x as often.
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--monitor-interval=0.5", f"--nproc-per-node={workers}",
                          "-m", module, *args],
                         cwd=REPO, check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def minimal(workers: int, epochs: int, train_samples: int) -> list[float]:
    return [line["samples_per_s"] for line in torchrun_lines(
        workers, "tools.bench.minimal_ddp", f"--epochs={epochs}",
        f"--train-samples={train_samples}")]


def paired(workers: int, pairs: int, samples: int) -> list[dict[str, Any]]:
    """tools/bench/paired.py's pairs after its warm-up pair."""
    return torchrun_lines(workers, "tools.bench.paired", f"--pairs={pairs}",
                          f"--train-samples={samples}")[1:]


def bootstrap_interval(values: list[float], draws: int = 2000) -> tuple[float, float]:
    """A 90% interval of the median of `values` (percentile bootstrap, fixed seed)."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values)))
                     for _ in range(draws))
    return medians[int(0.05 * draws)], medians[int(0.95 * draws) - 1]


def summarize_pairs(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    ratios = [p["ratio"] for p in pairs]
    quartiles = statistics.quantiles(ratios, n=4)
    return {"pairs": len(pairs), "median_ratio": statistics.median(ratios),
            "quartiles": [quartiles[0], quartiles[2]], "interval_90": bootstrap_interval(ratios),
            "median_samples_per_s": {side: statistics.median(p[side]["samples_per_s"]
                                                             for p in pairs)
                                     for side in ("ours", "minimal")},
            "page_faults_per_step": {side: statistics.median(p[side]["page_faults_per_step"]
                                                             for p in pairs)
                                     for side in ("ours", "minimal")},
            "ratios": ratios}


def describe_paired(p: dict[str, Any]) -> str:
    """The paired figures in a sentence (the console's and bench.md's)."""
    (low, high), faults = p["interval_90"], p["page_faults_per_step"]
    return (f"Paired epochs in one job ({p['pairs']} pairs): ratio {p['median_ratio']:.3f} "
            f"(quartiles {p['quartiles'][0]:.3f}-{p['quartiles'][1]:.3f}, 90% interval of the "
            f"median {low:.3f}-{high:.3f}), overhead {(1 - p['median_ratio']) * 100:+.1f}% "
            f"(target <= 3%), step throughput of both; page faults per step: ours "
            f"{faults['ours']:.0f}, minimal {faults['minimal']:.0f}")


def whole_epoch_samples_per_s(record: dict[str, Any]) -> float:
    """An epoch's samples/s counting the DDP sync probe that follows its steps (null, or
    absent in older records, where it did not run)."""
    return record["samples_per_s"] * record["epoch_time_s"] / (
        record["epoch_time_s"] + (record.get("probe_time_s") or 0.0))


def measure(rounds: int, epochs: int, workers: int, samples: int, pairs: int = 40,
            pair_samples: int = 2048) -> dict[str, Any]:
    """Alternate the two in separate runs, then pair their epochs in one job (the ratio
    against the target); the median samples/s of each over all counted epochs."""
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
    together = summarize_pairs(paired(workers, pairs, pair_samples))
    print(f"overhead paired   {together['pairs']} pairs of {pair_samples:,}-sample epochs: "
          f"median ratio {together['median_ratio']:.3f}", flush=True)
    ratio = together["median_ratio"]  # step throughput: the minimal loop has no probe
    return {"workers": workers, "global_batch": 256, "median_samples_per_s": med,
            "ratio_ours_over_minimal": ratio, "overhead_percent": (1 - ratio) * 100,
            "paired": together, "separate_runs_ratio": med["ours"] / med["minimal"],
            "epochs_counted": {k: len(v) for k, v in figures.items()}, "raw": figures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4, help="per run; the first is warm-up")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--train-samples", type=int, default=24_000)
    parser.add_argument("--pairs", type=int, default=40, help="paired epochs in one job")
    parser.add_argument("--out", default=str(REPO / "reports" / "overhead"))
    args = parser.parse_args(argv)
    if args.pairs < 2:
        parser.error("--pairs: at least 2 (their quartiles are reported)")
    result = measure(args.rounds, args.epochs, args.workers, args.train_samples, args.pairs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    med = result["median_samples_per_s"]
    print(f"\n{describe_paired(result['paired'])}")
    print(f"separate runs: make train {med['ours']:,.0f} samples/s, minimal DDP loop "
          f"{med['minimal']:,.0f} samples/s, ratio {result['separate_runs_ratio']:.3f}")
    print(f"written: {out / 'overhead.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
