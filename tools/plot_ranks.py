"""`make plot`'s per-rank picture (step_time_ranks.png): each rank's step time side by side,
where a straggler stands out. Its colours are the ones tools/plot.py uses for the phases."""

from __future__ import annotations

import statistics
import textwrap
from typing import Any

from matplotlib.figure import Figure

from common.records import PHASES

PHASE_COLORS = {"data": "#9e9e9e", "compute": "#4c72b0", "sync": "#dd8452", "optim": "#55a868"}


def rank_step_times(run: Any) -> dict[str, list[float]]:
    """Per-phase ms per step of each rank (`time_<phase>_ms_ranks`) of `run` (a tools.plot
    Run), averaged over the epochs that have them at the run's last world size (those with a
    sync time where some have one); {} for runs that lack them (older runs)."""
    size = len(run.records[-1].get("time_step_ms_ranks") or [])
    records = [r for r in run.records if len(r.get("time_step_ms_ranks") or []) == size]
    if not size:
        return {}
    # As step_time.png does: where some epochs have the sync (DDP's probe ran), only those;
    # in the others it is inside compute, and mixing them would count it twice.
    records = [r for r in records if r.get("time_sync_ms_ranks")] or records
    per_phase = {}
    for p in PHASES:
        # The sync where it is not measured (DDP between its probes, dp) is null: left out,
        # and 0 in a run that never measured it (its time is inside compute then).
        known = [r[f"time_{p}_ms_ranks"] for r in records if r.get(f"time_{p}_ms_ranks")]
        per_phase[p] = ([statistics.fmean(v[i] for v in known) for i in range(size)] if known
                        else [0.0] * size)
    return per_phase


def plot_rank_step_time(runs: list[Any]) -> Figure:
    """Each rank's step time side by side, one panel per run: a straggler's bar stands out,
    and the others' extra sync time is what they spent waiting for it."""
    fig = Figure(figsize=(max(6.0, 3.6 * len(runs)) + 1.0, 4.6))
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, run in zip(axes, runs, strict=True):
        per_rank = rank_step_times(run)
        ax.set_title(textwrap.fill(run.label, 34), fontsize=9)
        if not per_rank:
            ax.text(0.5, 0.5, "no per-rank step times\nin this run's records", ha="center",
                    va="center", transform=ax.transAxes, fontsize=9)
            ax.set_xticks([])
            continue
        ranks = range(len(per_rank[PHASES[0]]))
        bottom = [0.0] * len(ranks)
        for phase in PHASES:
            ax.bar(ranks, per_rank[phase], 0.6, bottom=bottom, color=PHASE_COLORS[phase],
                   label=phase)
            bottom = [b + v for b, v in zip(bottom, per_rank[phase], strict=True)]
        if len(ranks) > 1:  # one rank is no straggler
            slowest = max(ranks, key=lambda r: bottom[r] - per_rank["sync"][r])
            ax.annotate("slowest\n(before sync)", (slowest, bottom[slowest]), xytext=(0, 4),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(ranks), [f"rank {r}" for r in ranks], fontsize=8)
        ax.set_ylim(0, 1.2 * max(bottom + [1e-3]))
        ax.set_ylabel("ms per step (averaged over epochs)", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    # Beside the panels, not inside one: inside, it covered rank 0's bar.
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles[::-1], labels[::-1], fontsize=8, loc="upper right",
                   title="phase", title_fontsize=8)
    fig.suptitle("step time of each rank: data / compute / sync / optim", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.0 / fig.get_figwidth(), 1))
    return fig
