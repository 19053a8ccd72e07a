"""Faults planted in what a run writes (config `debug.disk_full_step`): a checkpoint write on a
disk that fills up, so tests can show that the full disk is one line and nothing is lost. The
step-file form is the checkpointer's own (`fill_disk_at`); DCP's (mode fsdp) is this writer."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any


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
