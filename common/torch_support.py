"""Which torch dptrain supports: the range in pyproject.toml's dependencies is the one source.

The launcher and the worker entry refuse a torch older than its minimum in one line (exit 2)
before they import anything that may fail on it. No `import torch` at module level: the check
runs first thing in both entry points.
"""

from __future__ import annotations

import os
import re
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import NoReturn

from common.errors import EXIT_USER_ERROR

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# torch's requirement: "torch>=2.11,<2.15" in pyproject.toml, "torch<2.15,>=2.11" in an
# installed package's metadata (its specifiers sorted); not torchvision's.
_TORCH_REQUIREMENT = re.compile(r"""^["']?torch(?![\w.-])([^;"'#]*)""")
_AT_LEAST = re.compile(r">=\s*([0-9][0-9.]*)")
REPORT_GRACE_S = 3.0  # other local ranks wait this long for local rank 0 to say why


def version_tuple(version: str) -> tuple[int, ...]:
    """(2, 11, 0) from "2.11.0", "2.11.0+cu130" or a nightly's "2.12.0.dev20260101"."""
    numbers = re.match(r"[0-9]+(?:\.[0-9]+)*", version.strip())
    if numbers is None:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in numbers.group(0).split("."))


def _requirements() -> list[str]:
    """The project's dependency lines: from pyproject.toml in a checkout, else from the
    installed package's metadata (which pyproject.toml made)."""
    if PYPROJECT.is_file():
        return [line.strip().rstrip(",") for line in PYPROJECT.read_text().splitlines()]
    return metadata.requires("dptrain") or []


def minimum_torch() -> str:
    """The oldest torch the project supports, e.g. "2.11"."""
    for line in _requirements():
        requirement = _TORCH_REQUIREMENT.match(line)
        found = requirement and _AT_LEAST.search(requirement.group(1))
        if found:
            return found.group(1).rstrip(".")
    raise RuntimeError(f"no torch>=... requirement in {PYPROJECT} (nor in dptrain's metadata)")


def torch_problem(installed: str | None = None) -> str | None:
    """One line when the installed torch (`installed`, default torch.__version__) is older
    than the minimum; None when it is supported."""
    if installed is None:
        import torch  # late: the entry points call this before their other imports

        installed = str(torch.__version__)
    needed = minimum_torch()
    width = len(version_tuple(needed))
    if version_tuple(installed)[:width] >= version_tuple(needed):
        return None
    return (f"torch {installed} is installed, dptrain needs torch>={needed} (pyproject.toml): "
            f"install a supported torch, e.g. `make venv` (requirements.txt)")


def refuse_unsupported_torch() -> None:
    """Exit 2 with one line (from local rank 0 only, when torchrun started several workers)
    if this torch is older than the minimum; return when it is supported."""
    problem = torch_problem()
    if problem is not None:
        _refuse(problem)


def _refuse(problem: str) -> NoReturn:
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"error: {problem}", file=sys.stderr, flush=True)
    else:
        # torchrun stops every worker at the first exit: local rank 0 must print first.
        time.sleep(REPORT_GRACE_S)
    sys.exit(EXIT_USER_ERROR)
