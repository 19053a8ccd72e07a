"""Axes that say what the numbers are, for every figure the tools draw: whole epochs, and value
ranges that do not blow a difference in the fourth decimal up to the full height."""

from __future__ import annotations

import math
from typing import Any

from matplotlib.ticker import MaxNLocator


def epoch_axis(ax: Any, last: int) -> None:
    """Whole epochs on the x axis, also for a run of one epoch (matplotlib would otherwise
    spread 0.95-1.05 around a lone point)."""
    ax.set_xlim(0.5, last + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def value_axis(ax: Any, values: list[float], least: float, floor: float | None = 0.0,
               ceiling: float | None = None) -> None:
    """A y axis over `values` that spans at least `least` (matplotlib scales any range, even
    1e-8, to the full height, with an offset such as "1e-8+2.29" at the top), within
    [`floor`, `ceiling`], written without an offset."""
    present = [v for v in values if not math.isnan(v)]
    if present:
        low, high = min(present), max(present)
        pad = max(0.0, least - (high - low)) / 2 + 0.05 * max(high - low, least)
        low, high = low - pad, high + pad
        if floor is not None and low < floor:
            low, high = floor, max(high, floor + least)
        if ceiling is not None and high > ceiling:
            low, high = min(low, ceiling - least), ceiling
        ax.set_ylim(low, high)
    ax.yaxis.get_major_formatter().set_useOffset(False)
