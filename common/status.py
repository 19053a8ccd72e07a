"""What the workers of a node tell their launcher: whether training began, and where it
stopped. After a signal torchrun's agent reports no exit codes; with this file (named by the
launcher in DPTRAIN_STATUS_FILE) the launcher says in one true line what happened.

Written by local rank 0 only: every rank agrees on where the loop stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from common.files import atomic_write

STATUS_ENV = "DPTRAIN_STATUS_FILE"
PARENT_ENV = "DPTRAIN_PARENT_PID"  # the launcher's pid, the workers' parent


def report(**facts: Any) -> None:
    """Replace the status with `facts` (trained_from=step, stopped_at=step); no launcher: no-op."""
    path = os.environ.get(STATUS_ENV)
    if not path or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    with contextlib.suppress(OSError):  # the launcher then says less, never something false
        atomic_write(Path(path), lambda p: p.write_text(json.dumps(facts)))


def read(path: Path) -> dict[str, Any] | None:
    """What the workers reported; None when they never began training."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def started_by_launcher() -> bool:
    """Whether our launcher started this worker (not torchrun or python directly)."""
    return bool(os.environ.get(STATUS_ENV)) and os.environ.get(PARENT_ENV, "").isdigit()


def launcher_reports() -> bool:
    """Whether this worker's launcher is alive to tell the user why the job stopped (then the
    worker says nothing about it itself)."""
    return started_by_launcher() and os.getppid() == int(os.environ[PARENT_ENV])
