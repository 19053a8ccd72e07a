"""Failures that torch reports in its own words and that have one known cause: the line a user
gets instead (the loop's `explain_failure` asks here first)."""

from __future__ import annotations

from collections.abc import Callable

from common.errors import CheckFailed, UserError


def _unused_parameters(step: int) -> UserError:
    return CheckFailed(
        f"some parameters got no gradient in step {step}: the model's forward does not use "
        f"them, and DDP waits for their gradients forever; set "
        f"ddp.find_unused_parameters=true (slower), or remove them", agreed=True)


PHASE_WHERE = {  # what a failure message says the loop was doing in each phase
    "data": "loading a batch", "compute": "forward/backward (DDP's gradient allreduce runs in "
    "backward)", "sync": "the gradient allreduce", "optim": "the optimizer step"}

# (text torch's message contains, the line it means): DDP's reducer on unused parameters.
KNOWN: list[tuple[str, Callable[[int], UserError]]] = [
    ("Expected to have finished reduction", _unused_parameters),
]


def known_failure(exc: BaseException, step: int) -> UserError | None:
    """One line for a failure whose cause is known, else None."""
    text = str(exc)
    return next((line(step) for marker, line in KNOWN if marker in text), None)
