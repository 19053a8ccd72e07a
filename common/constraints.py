"""Value constraints for config keys, checked by the engine (common/config.py) beside each key
of the schema (common/schema.py): `Annotated[int, Positive]`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any


@dataclass(frozen=True)
class Check:
    """A value constraint: `test(value)` must hold, else the key "must ..." (`says`)."""

    test: Callable[[Any], bool]
    says: str  # completes "config: train.epochs ..."
    hint: str = ""  # appended after the value, e.g. what to set instead

    def failure(self, key: str, value: Any) -> str | None:
        if self.test(value):
            return None
        return f"{key} {self.says}; got {value}" + (f"; {self.hint}" if self.hint else "")


def AtLeast(low: float, why: str = "") -> Check:  # noqa: N802 - reads like a type
    return Check(lambda v: v >= low, f"must be at least {low}" + (f" ({why})" if why else ""))


Positive = Check(lambda v: v > 0, "must be positive")
NonNegative = Check(lambda v: v >= 0, "must not be negative")
RUNTIME = "runtime"  # marker: not part of a run's identity

PositiveInt = Annotated[int, Positive]


def fraction_range(v: list[float]) -> bool:
    return len(v) == 2 and 0 < v[0] <= v[1] <= 1


def ratio_range(v: list[float]) -> bool:
    return len(v) == 2 and 0 < v[0] <= v[1]


PositiveFloat = Annotated[float, Positive]


def parse_step_range(text: str) -> tuple[int, int] | None:
    """"A-B" (1-based optimizer steps, A <= B; "A" alone is A-A) -> (A, B); None if malformed."""
    low, _, high = text.strip().partition("-")
    if not (low.isdigit() and (high.isdigit() or not high)):
        return None
    first, last = int(low), int(high or low)
    return (first, last) if 1 <= first <= last else None


StepRange = Check(lambda v: v == "" or parse_step_range(v) is not None,
                  "must be A-B, optimizer steps counted from 1 with A <= B (e.g. 10-12)",
                  "leave it empty for no profile")
