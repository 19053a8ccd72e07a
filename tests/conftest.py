"""Every test runs with the GPUs hidden, and so does every process it starts.

The tests that are not marked `gpu` are the CPU twins: without this, `dist.device=auto` would
pick CUDA on a GPU machine and e.g. refuse 2 workers on a 1-GPU box. Tests marked `gpu` give
their subprocesses the GPUs back with `tests.helpers.gpu_env()`. pytest imports this file
before any test module, so before anything can start CUDA.
"""

from tests.helpers import hide_gpus

hide_gpus()

import pytest  # noqa: E402 - after hide_gpus, which must come first

# Files whose every test is in the torch-2.11 tier (`make test-torch211`, marker `compat`),
# tests added later included: gpu-check's own runner and its CPU self-test.
COMPAT_FILES = {"test_gpu_check.py"}


@pytest.hookimpl(tryfirst=True)  # before `-m compat` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in COMPAT_FILES:
            item.add_marker(pytest.mark.compat)
