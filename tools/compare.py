"""`make compare`: one experiment through every path and worker count, side by side.

    python -m tools.compare [--config C] [--workers 1,2] [--epochs N] [--out DIR] [key=value ...]

Runs `python -m launch` for ddp, scratch (ring and naive allreduce) and dp, with 1 and N
workers (dp: one process), all in one wandb group, and writes into the report folder:
`compare.md` (the table), `compare.png` (test accuracy per epoch, and throughput) and
`compare.json` (every figure). Without GPUs: LeNet on the synthetic data, 3 epochs, 1 and 2
CPU workers with one thread each; with GPUs: the book's LeNet on Fashion-MNIST, 1 and every
visible GPU. Every run trains from scratch (`checkpoint.resume=false`), even into a run folder
that a previous comparison left behind. The report names every key in which the runs differ
from the config, and says how each figure was obtained for the epochs at hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.config import flatten, load_config, to_dict
from common.host import visible_gpus

REPO = Path(__file__).resolve().parent.parent

PATHS = {  # label -> launcher flags and overrides
    "ddp": (["--mode", "ddp"], []),
    "scratch ring": (["--mode", "scratch"], ["scratch.algorithm=ring"]),
    "scratch naive": (["--mode", "scratch"], ["scratch.algorithm=naive"]),
    "dp": (["--mode", "dp"], []),
}
# Set by the path or the run folder, not a difference from the config worth a line.
COMPARED = ("mode", "scratch.algorithm", "run.dir", "run.name", "run.overwrite", "wandb.group")


def steady(epochs: int) -> str:
    """Which epochs a figure is read from, in words."""
    if epochs == 1:
        return "the run's only epoch (its first, so warm-up included)"
    if epochs == 2:
        return "the second epoch (the first is warm-up)"
    return f"the median over epochs 2-{epochs} (the first is warm-up)"


def methods(epochs: int) -> dict[str, str]:
    """How each column is obtained, worded for runs of `epochs` epochs."""
    return {
        "samples/s": f"training samples per second of the main worker, {steady(epochs)}",
        "epoch time": f"seconds of training steps per epoch (evaluation and the sync probe "
                      f"not included), {steady(epochs)}",
        "sync ms/step": "gradient synchronization per step, mean over ranks, from the same "
                        "epochs (or, where none has it, every epoch that has it): measured "
                        "around our allreduce for scratch; for ddp estimated after an epoch's "
                        "steps as a forward+backward with gradient sync minus one under "
                        "no_sync() (DDP overlaps it with backward, so only the exposed part "
                        "shows), in the epochs where that probe ran (log.sync_probe; every "
                        "epoch when it costs at most 3% of one, else once per run, never in "
                        "a run shorter than an epoch: n/a); dp: n/a, inside forward/backward, "
                        "not separable",
        "speedup": "samples/s over the same path with one worker",
    }


@dataclass
class Result:
    path: str
    workers: int
    run_dir: str
    records: list[dict[str, Any]] = field(default_factory=list)

    def median(self, key: str) -> float | None:
        """The median over the epochs after the first (all of them for a 1-epoch run) that
        have `key`; over every epoch that has it when none of those does; else None (n/a)."""
        later = self.records[1:] or self.records
        for records in (later, self.records):
            values = [r[key] for r in records if r.get(key) is not None]
            if values:
                return statistics.median(values)
        return None


def default_workers(gpus: int, cpu: bool) -> str:
    """1 and 2 CPU workers; on GPUs 1 and every visible one (just 1 when only one is visible)."""
    if cpu:
        return "1,2"
    return "1" if gpus == 1 else f"1,{gpus}"


def override(overrides: list[str], key: str) -> str | None:
    """The value the user gave `key` on the command line (the last one wins), or None."""
    given = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].strip() == key]
    return given[-1] if given else None


def run_flags(args: argparse.Namespace) -> list[str]:
    """What every run gets besides its path: a fresh start, and on the CPU one thread per worker
    (as one device per worker), so that the speedup measures workers, not extra threads."""
    flags = ["checkpoint.resume=false"]  # else a finished run folder resumes: stale figures
    if args.cpu and override(args.overrides, "dist.cpu_threads") is None:
        flags.append("dist.cpu_threads=1")
    return flags


def common_overrides(args: argparse.Namespace) -> list[str]:
    """What every run gets on top of the config, whatever its path and worker count."""
    device = ["dist.device=cpu"] if args.cpu else []  # what the launcher's --cpu sets
    return [f"train.epochs={args.epochs}", *device, *run_flags(args), *args.overrides]


def config_changes(args: argparse.Namespace) -> list[str]:
    """`key=value (config: value)` for every key in which the runs differ from the config file,
    besides the path itself and the run folder."""
    given = flatten(to_dict(load_config(args.config)))
    runs = flatten(to_dict(load_config(args.config, common_overrides(args))))
    return [f"{k}={runs[k]} (config: {given.get(k)})" for k in sorted(runs)
            if k not in COMPARED and runs[k] != given.get(k)]


def run_one(path: str, workers: int, args: argparse.Namespace, group: str) -> Result:
    flags, overrides = PATHS[path]
    run_dir = Path(args.out) / "runs" / f"{path.replace(' ', '-')}-{workers}"
    cmd = [sys.executable, "-m", "launch", *flags, "--gpus", str(workers), args.config,
           f"run.dir={run_dir}", "run.overwrite=true", f"wandb.group={group}",
           *overrides, *common_overrides(args)]
    print(f"compare: {path}, {workers} worker(s) ...", flush=True)
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-2000:] + done.stderr[-2000:])
        raise SystemExit(f"error: the {path} run with {workers} worker(s) failed "
                         f"(exit {done.returncode}); its output is above")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    result = Result(path, workers, str(run_dir), [json.loads(line) for line in lines])
    print(f"compare: {path}, {workers} worker(s): {result.median('samples_per_s'):,.0f} "
          f"samples/s ({time.perf_counter() - started:.0f} s)", flush=True)
    return result


def table(results: list[Result]) -> list[dict[str, Any]]:
    base = {r.path: r.median("samples_per_s") for r in results if r.workers == 1}
    rows = []
    for r in results:
        speed = r.median("samples_per_s")
        rows.append({
            "path": r.path, "workers": r.workers, "samples_per_s": speed,
            "epoch_time_s": r.median("epoch_time_s"),
            "sync_ms_per_step": r.median("time_sync_ms"),
            "test_accuracy": r.records[-1]["test_accuracy"],
            "speedup": speed / base[r.path] if r.path in base else None,
            "sync_method": r.records[-1]["sync_method"],
        })
    return rows


def markdown(rows: list[dict[str, Any]], note: str, how: dict[str, str]) -> str:
    out = ["| path | workers | samples/s | epoch time (s) | sync ms/step | test accuracy | "
           "speedup over 1 worker |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "n/a"
        sync = f"{r['sync_ms_per_step']:.2f}" if r["sync_ms_per_step"] is not None else "n/a"
        out.append(f"| {r['path']} | {r['workers']} | {r['samples_per_s']:,.0f} | "
                   f"{r['epoch_time_s']:.2f} | {sync} | "
                   f"{r['test_accuracy']:.2%} | {speedup} |")
    out += ["", note, "", "How each figure is obtained:", ""]
    out += [f"- **{name}**: {text}" for name, text in how.items()]
    return "\n".join(out) + "\n"


def compare_figure(results: list[Result]) -> Any:
    """Test accuracy per epoch (left) and throughput (right). Runs of one global batch give
    the same accuracy: earlier series are drawn wider, so none hides another, and the y axis
    spans at least 0.1 (matplotlib would blow 0.8504-0.8512 up to the full height)."""
    from matplotlib.figure import Figure  # no pyplot: no display, no global figure registry

    from tools.axes import epoch_axis, value_axis

    fig = Figure(figsize=(12, 4.5))
    left, right = fig.subplots(1, 2)
    accuracies = [x["test_accuracy"] for r in results for x in r.records]
    for i, r in enumerate(results):
        wide = len(results) - 1 - i
        left.plot([x["epoch"] for x in r.records], [x["test_accuracy"] for x in r.records],
                  marker="o", lw=1.5 + 1.2 * wide, ms=4 + 2 * wide, alpha=0.8, color=f"C{i}",
                  label=f"{r.path}, {r.workers} worker(s)")
    value_axis(left, accuracies, least=0.1, floor=0.0, ceiling=1.0)
    epoch_axis(left, max(x["epoch"] for r in results for x in r.records))
    left.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy per epoch")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    labels = [f"{r.path.replace(' ', chr(10))}\n{r.workers}w" for r in results]
    speeds = [r.median("samples_per_s") for r in results]
    bars = right.bar(range(len(results)), speeds, color=[f"C{i}" for i in range(len(results))])
    right.bar_label(bars, labels=[f"{s:,.0f}" for s in speeds], fontsize=8)
    right.set_xticks(range(len(results)), labels, fontsize=8)
    right.set_ylim(0, 1.12 * max(speeds))
    right.set(ylabel="samples/s", title="training throughput")
    fig.tight_layout()
    return fig


def figure(results: list[Result], path: Path) -> None:
    compare_figure(results).savefig(path, dpi=120)


def command_line(gpus: int) -> argparse.ArgumentParser:
    """The options, with defaults for a machine with `gpus` visible GPUs."""
    parser = argparse.ArgumentParser(prog="python -m tools.compare",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / (
        "lenet_fashion_mnist.yaml" if gpus else "default.yaml")),
        help="the config every run trains (default: configs/default.yaml; with GPUs "
             "configs/lenet_fashion_mnist.yaml)")
    parser.add_argument("--workers", default=None,
                        help="comma-separated worker counts (default: 1,2 CPU workers; on GPUs "
                             "1 and every visible one)")
    parser.add_argument("--epochs", type=int, default=10 if gpus else 3,
                        help="epochs of each run (default 3; with GPUs 10)")
    parser.add_argument("--paths", default=",".join(PATHS),
                        help=f"comma-separated paths to run, of {', '.join(PATHS)} (default: all)")
    parser.add_argument("--cpu", action="store_true", help="CPU workers even with GPUs")
    parser.add_argument("--out", default=str(REPO / "reports" / "compare"),
                        help="the report folder: compare.md, compare.png, compare.json and the "
                             "runs (default: reports/compare)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides every run gets (e.g. train.batch_size=64)")
    return parser


def main(argv: list[str] | None = None) -> int:
    gpus = visible_gpus()
    parser = command_line(gpus)
    args = parser.parse_args(argv)
    args.cpu = args.cpu or not gpus or override(args.overrides, "dist.device") == "cpu"
    args.out = str(Path(args.out).resolve())  # the runs see it from the repo, not from here
    if args.workers is None:
        args.workers = default_workers(gpus, args.cpu)
    workers = [int(w) for w in args.workers.split(",")]
    paths = [p.strip() for p in args.paths.split(",")]
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        print(f"error: unknown path {unknown[0]!r}; choose from {', '.join(PATHS)}",
              file=sys.stderr)
        return 2
    group = f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    results = []
    for path in paths:
        # dp is one process; on the CPU it has nothing to split, so one run says it all.
        counts = [1] if path == "dp" and args.cpu else workers
        results += [run_one(path, w, args, group) for w in counts]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = table(results)
    threads = override(args.overrides, "dist.cpu_threads") or "1"
    each = "one thread each" if threads == "1" else f"{threads} threads each"
    device = f"CPU workers (gloo), {each}" if args.cpu else "GPUs"
    changes = config_changes(args)
    note = (f"{Path(args.config).name}, {args.epochs} epoch{'' if args.epochs == 1 else 's'}, "
            f"{device}; wandb group {group}. The same seed, data, model, loop and global batch "
            f"in every run; what they change in the config: "
            f"{', '.join(changes) if changes else 'nothing'}.")
    how = methods(args.epochs)
    (out / "compare.md").write_text(markdown(rows, note, how))
    (out / "compare.json").write_text(json.dumps(
        {"note": note, "config_changes": changes, "methods": how, "rows": rows,
         "runs": [asdict(r) for r in results]}, indent=2) + "\n")
    figure(results, out / "compare.png")
    print("\n" + markdown(rows, note, how))
    print(f"written: {out / 'compare.md'}, {out / 'compare.png'}, {out / 'compare.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
