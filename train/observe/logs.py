"""Logging set up once per worker: the main rank informs, the others speak only when wrong."""

from __future__ import annotations

import logging
import sys


def setup_logging(rank: int) -> None:
    """Main rank: info to stdout. Other ranks: only warnings and errors, prefixed with the rank."""
    handler = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    fmt = "%(message)s" if rank == 0 else f"[rank {rank}] %(levelname)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
