"""Faults planted on purpose (config `debug.*`), so tests can show that the guards catch them."""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.schema import DebugConfig
from common.signals import stop_signals
from train.dist import DistContext

log = logging.getLogger(__name__)


class Faults:
    """Faults planted on purpose (config `debug.*`), so tests can show that guards catch them."""

    def __init__(self, cfg: DebugConfig, ctx: DistContext):
        self.cfg, self.rank = cfg, ctx.rank
        self.skip_set_epoch = cfg.skip_set_epoch  # every epoch the same order

    def inside_step(self, step: int) -> None:
        if self.rank == self.cfg.stall_rank and step == self.cfg.stall_step:
            log.warning("debug: stalling %.0f s in step %d", self.cfg.stall_seconds, step)
            time.sleep(self.cfg.stall_seconds)

    def after_step(self, model: nn.Module, step: int) -> None:
        if self.rank == self.cfg.desync_rank and step == self.cfg.desync_step:
            with torch.no_grad():
                next(model.parameters()).add_(1e-3)
        if self.rank == self.cfg.sigterm_rank and step == self.cfg.sigterm_step:
            os.kill(os.getpid(), signal.SIGTERM)
            # The watcher thread records it: wait for that, so the stop lands where planned.
            deadline = time.monotonic() + 5
            while not stop_signals().requested and time.monotonic() < deadline:
                time.sleep(0.001)


def full_disk_writer(folder: Path, rank: int) -> Any:
    """DCP's file writer of rank `rank` on a disk that fills up (debug.disk_full_step in mode
    fsdp): it writes half a file, then the write fails with ENOSPC, as a real full disk does."""
    from torch.distributed.checkpoint import FileSystemWriter

    class FullDisk(FileSystemWriter):
        def write_data(self, plan: Any, planner: Any) -> Any:
            part = Path(self.path) / f"__{rank}_0.distcp"
            part.write_bytes(bytes(4096))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(part))

    return FullDisk(folder, sync_files=True, thread_count=1)
