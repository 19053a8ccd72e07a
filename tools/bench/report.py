"""bench.md and bench.png from the figures `make bench` measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tools.bench.overhead import describe_paired


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n >= 2**20 else f"{n // 2**10} KiB"


def markdown(report: dict[str, Any]) -> str:
    """bench.md: one section per part of the benchmark that ran (each absent part skipped)."""
    lines: list[str] = []
    for key, section in SECTIONS:
        if key in report:
            lines += section(report)
    lines += ["", f"{report['cores']} cores; {report['seconds']:.0f} s in all."]
    return "\n".join(lines) + "\n"


def _targets(report: dict[str, Any]) -> list[str]:
    lines = ["## Targets", "", "| target | measured | goal | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        met = {True: "yes", False: "no", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {value} | {t['goal']} | {met} |")
    return lines


def _scaling(report: dict[str, Any]) -> list[str]:
    lines = ["", "## Scaling (one thread per worker, LeNet, global batch 256)", "",
             "dp is one process whatever the number of devices; on CPUs it has nothing to "
             "split, so it has no row here (`make compare` shows it).", "",
             "| path | workers | samples/s | speedup | efficiency |", "|---|---|---|---|---|"]
    for path, counts in report["scaling"].items():
        for n, r in counts.items():
            lines.append(f"| {path} | {n} | {r['samples_per_s']:,.0f} | {r['speedup']:.2f}x | "
                         f"{r['efficiency']:.0%} |")
    return lines


def _allreduce(report: dict[str, Any]) -> list[str]:
    ar = report["allreduce"]
    copy = ar["copy_bandwidth_GBps"]
    n = ar["world_size"]
    lines = ["", f"## Allreduce, {n} ranks ({ar['device']}; copy bandwidth {copy:.2f} GB/s)", "",
             "algbw = bytes / time, busbw = algbw * 2(n-1)/n (nccl-tests); ring bound = the time "
             "to move 2(n-1)/n of the bytes at the copy bandwidth; fraction = bound / time.", "",
             "| size | torch ms | ring ms | naive ms | torch busbw | ring busbw | naive busbw | "
             "ring / torch | ring vs bound |", "|---|---|---|---|---|---|---|---|---|"]
    for r in ar["rows"]:
        bound = 2 * (n - 1) / n * r["bytes"] / (copy * 1e9)
        lines.append(
            f"| {_size(r['bytes'])} | {1000 * r['torch']['seconds']:.2f} | "
            f"{1000 * r['ring']['seconds']:.2f} | {1000 * r['naive']['seconds']:.2f} | "
            f"{r['torch']['busbw_GBps']:.2f} | {r['ring']['busbw_GBps']:.2f} | "
            f"{r['naive']['busbw_GBps']:.2f} | "
            f"{r['ring']['algbw_GBps'] / r['torch']['algbw_GBps']:.2f} | "
            f"{bound / r['ring']['seconds']:.0%} |")
    return lines


def _resnet_sync(report: dict[str, Any]) -> list[str]:
    s = report["resnet_sync"]
    lines = ["", f"## ResNet-18 gradients ({s['tensors']} tensors, {s['bytes'] / 1e6:.0f} MB)",
             "", "| how | ms |", "|---|---|"]
    for key in ("torch_per_parameter", "torch_flat", "ring_per_parameter", "ring_bucketed_25mb"):
        lines.append(f"| {key.replace('_', ' ')} | {1000 * s[key]:.1f} |")
    return lines


def _ddp(report: dict[str, Any]) -> list[str]:
    d = report["ddp"]
    lines = ["", f"## DDP on ResNet-18 (batch {d['batch_per_worker']} per worker)", "",
             "| bucket_cap_mb | step ms |", "|---|---|"]
    lines += [f"| {cap} | {1000 * t:.0f} |" for cap, t in d["bucket_sweep_s"].items()]
    lines += ["", "Overlap: a step with sync takes "
              f"{1000 * d['step_s']:.0f} ms; without sync (no_sync) "
              f"{1000 * d['compute_only_s']:.0f} ms; the allreduce of all gradients alone "
              f"{1000 * d['sync_only_s']:.0f} ms. "
              f"Hidden behind backward: compute + sync - step = {1000 * d['hidden_sync_s']:.0f} "
              f"ms, {d['hidden_fraction']:.0%} of the sync."]
    return lines


def _overhead(report: dict[str, Any]) -> list[str]:
    o = report["overhead"]
    return ["", "## Framework overhead (identical knobs)", "", describe_paired(o["paired"]) + ".",
            "",
            f"Separate runs, alternating: `make train` {o['median_samples_per_s']['ours']:,.0f} "
            f"samples/s, minimal DDP loop {o['median_samples_per_s']['minimal']:,.0f} samples/s "
            f"(ratio {o['separate_runs_ratio']:.3f}). Counting the DDP sync probe that ends each "
            f"of our epochs: {o['median_samples_per_s']['ours_whole_epoch']:,.0f} samples/s."]


def _data(report: dict[str, Any]) -> list[str]:
    d = report["data"]
    t, rate = d["throughput"], d["throughput"]["images_per_s"]
    lines = ["", f"## Data, synthetic: {d['train_images']} JPEGs of 64-160 px, imagenet recipe at "
             f"{d['size']} px, {d['workers']} loader processes, batch {d['batch']}", "",
             "Loader throughput, no model (normalized float batches ready for the model; "
             "medians of the epochs after the first):", "",
             "| path | images/s | vs torchvision |", "|---|---|---|"]
    for name, label in (("torchvision", "torchvision recipe (ImageFolder, PIL, transforms.v2, "
                         "DataLoader)"), ("stream", "stream path (data.loader=stream)"),
                        ("cache", "decoded cache, later epochs (data.cache=decoded)")):
        lines.append(f"| {label} | {rate[name]:,.0f} | {rate[name] / rate['torchvision']:.2f}x |")
    lines += ["", f"The cache's first epoch (decoding into it): {t['cache_first_epoch']:,.0f} "
              f"images/s.", "", "Decoders, one process, the same files and training views "
              "(decode, crop, resize, flip):", "", "| decoder | ms per sample |", "|---|---|"]
    for name, ms in d["decoders"]["ms_per_sample"].items():
        lines.append(f"| {name} | {ms:.2f} |")
    lines += [f"| {name} | {why} |" for name, why in d["decoders"]["skipped"].items()]
    lines += ["", f"ResNet-18 at {d['size']} px, batch {d['wait_batch']}, SGD, {d['workers']} "
              "loader processes, one training process:", "",
              "| path | step s | data wait |", "|---|---|---|"]
    for name, w in d["wait"].items():
        lines.append(f"| {name} | {w['step_s']:.2f} | {w['wait_share']:.1%} |")
    return lines


def _photos(report: dict[str, Any]) -> list[str]:
    from tools.bench.photo_report import table  # imports torch, PIL when asked

    return table(report["data_photos"])


def _peers(report: dict[str, Any]) -> list[str]:
    if not report.get("peers"):
        return []
    o = report["overhead"]
    lines = ["", "## Against a plain loop and peers (their default settings)", "",
             "Our side: whole epochs of `make train` (steps and the sync probe), "
             f"{o['median_samples_per_s']['ours_whole_epoch']:,.0f} samples/s.", "",
             f"With perf.compile=on: {report['compiled']['samples_per_s']:,.0f} samples/s "
             f"after {report['compiled']['compile_time_s']:.0f} s of compiling (auto "
             f"compiles runs of perf.compile_min_steps steps or more).", "",
             "| loop | samples/s | our epoch time / theirs | with compile |",
             "|---|---|---|---|"]
    for name, p in report["peers"].items():
        if "skipped" in p:
            lines.append(f"| {name} | skipped: {p['skipped']} | | |")
        else:
            lines.append(f"| {name} | {p['samples_per_s']:,.0f} | "
                         f"{p['our_epoch_time_ratio']:.2f} | "
                         f"{p['compiled_epoch_time_ratio']:.2f} |")
    return lines


def memory_lines(report: dict[str, Any]) -> list[str]:
    m = report["memory"]
    lines = ["", f"## Memory per rank ({m['model']}, SGD with momentum, fp32)", "",
             "Bytes each rank holds between steps (the largest over ranks); vs 1/N of DDP = "
             "this / (DDP's / N), goal at most {:.2f}.".format(m["goal"]), "",
             "| path | workers | parameters MiB | gradients MiB | optimizer MiB | total MiB | "
             "optimizer vs 1/N of DDP | total vs 1/N of DDP |", "|---|---|---|---|---|---|---|---|"]
    for r in m["rows"]:
        mib = " | ".join(f"{r[k] / 2**20:.2f}" for k in
                         ("parameters", "gradients", "optimizer", "total"))
        lines.append(f"| {r['path']} | {r['workers']} | {mib} | {r['optimizer_vs_ideal']:.3f} | "
                     f"{r['total_vs_ideal']:.3f} |")
    return lines


SECTIONS = [("targets", _targets), ("scaling", _scaling), ("allreduce", _allreduce),
             ("resnet_sync", _resnet_sync), ("ddp", _ddp), ("data_photos", _photos),
             ("data", _data),
             ("overhead", _overhead), ("memory", memory_lines), ("peers", _peers)]


def figure(report: dict[str, Any], path: Path) -> None:
    bench_figure(report).savefig(path, dpi=110)


def bench_figure(report: dict[str, Any]) -> Any:
    """bench.png: scaling, allreduce bandwidth, ResNet-18 sync, our epoch time vs theirs."""
    from matplotlib.figure import Figure  # no pyplot: no display, no global figure registry
    from matplotlib.ticker import MaxNLocator

    from tools.axes import value_axis

    fig = Figure(figsize=(13, 9))
    axes = fig.subplots(2, 2)
    ax = axes[0][0]
    scaling = report["scaling"]
    for i, (path_name, counts) in enumerate(scaling.items()):
        wide = len(scaling) - 1 - i  # earlier series wider: paths that agree stay visible
        ax.plot([float(c) for c in counts], [r["samples_per_s"] for r in counts.values()],
                marker="o", lw=1.5 + wide, ms=5 + 2 * wide, alpha=0.85, label=path_name)
    ax.set(title="scaling (one thread per worker)", xlabel="workers", ylabel="samples/s")
    workers = [float(c) for counts in scaling.values() for c in counts] or [1.0]
    ax.set_xlim(min(workers) - 0.5, max(workers) + 0.5)  # whole workers, even for one count
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    speeds = [r["samples_per_s"] for counts in scaling.values() for r in counts.values()]
    value_axis(ax, speeds, least=0.1 * max(speeds + [1.0]))
    ax.legend()
    ax = axes[0][1]
    rows = report["allreduce"]["rows"]
    for wide, name in zip((2, 1, 0), ("torch", "ring", "naive"), strict=True):
        ax.plot([r["bytes"] for r in rows], [r[name]["busbw_GBps"] for r in rows], marker="o",
                lw=1.5 + wide, ms=5 + 2 * wide, alpha=0.85, label=name)
    ax.set(xscale="log", title="allreduce bus bandwidth", xlabel="bytes", ylabel="GB/s")
    ax.legend()
    ax = axes[1][0]
    s = report["resnet_sync"]
    keys = ("torch_per_parameter", "torch_flat", "ring_per_parameter", "ring_bucketed_25mb")
    bars = ax.bar(range(4), [1000 * s[k] for k in keys], color=["C0", "C0", "C1", "C1"])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_xticks(range(4), [k.replace("_", "\n") for k in keys], fontsize=8)
    ax.set(title="ResNet-18 gradient sync", ylabel="ms")
    ax = axes[1][1]
    names, ratios = [], []
    for name, p in report["peers"].items():
        if "our_epoch_time_ratio" in p:
            names.append(name)
            ratios.append(p["our_epoch_time_ratio"])
    names.append("minimal loop,\nsame knobs")
    ratios.append(1 / report["overhead"]["ratio_ours_over_minimal"])
    bars = ax.bar(range(len(names)), ratios)
    ax.bar_label(bars, fmt="%.2f")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylim(0, 1.15 * max(ratios + [1.0]))  # room for the labels above the 1.0 line
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set(title="our epoch time / theirs (lower is faster)", ylabel="ratio")
    fig.tight_layout()
    return fig
