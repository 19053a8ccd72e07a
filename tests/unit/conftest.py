"""The unit tier: pure logic in this process. No test here may start a process or join a
process group; the guard below fails a test that tries, so the tier stays fast (`make
test-fast`) and its name stays true. Tests that need real processes live in tests/."""

from __future__ import annotations

import _posixsubprocess
import os

import pytest
import torch.distributed


def _refused(what: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"tests/unit may not {what}: move the test to tests/ "
                             "(the tier with real processes)")
    return refuse


@pytest.fixture(autouse=True)
def no_processes(monkeypatch):
    # subprocess and multiprocessing's spawn and forkserver all start children through
    # fork_exec; the fork start method (and DataLoader workers) through os.fork.
    monkeypatch.setattr(_posixsubprocess, "fork_exec", _refused("start a process"))
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, _refused("start a process"))
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        _refused("join a process group"))
