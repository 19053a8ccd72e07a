"""Every test runs with the GPUs hidden, and so does every process it starts.

The tests that are not marked `gpu` are the CPU twins: without this, `dist.device=auto` would
pick CUDA on a GPU machine and e.g. refuse 2 workers on a 1-GPU box. Tests marked `gpu` give
their subprocesses the GPUs back with `tests.helpers.gpu_env()`. pytest imports this file
before any test module, so before anything can start CUDA.
"""

import getpass
import os
import tempfile

from tests.helpers import hide_gpus

hide_gpus()

import pytest  # noqa: E402 - after hide_gpus, which must come first

# Inductor's kernel cache (torch 2.14.1) does not tell kernels built under one
# ATEN_CPU_CAPABILITY from another's: after a run under avx512, a compiled run under avx2
# loaded them and trained to NaN, one under `default` failed to build (2026-12-06). One cache
# per capability, for the parity checks docs/testing.md asks for; the processes tests start
# inherit it.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(),
    f"torchinductor_{getpass.getuser()}_{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}"))

# Files whose every test is in the torch-2.11 tier (`make test-torch211`, marker `compat`),
# tests added later included: gpu-check's own runner and its CPU self-test.
COMPAT_FILES = {"test_gpu_check.py"}

# The files that take longest in each pass of `make test`, longest first (seconds of their
# tests in one run here, 2026-12-06; docs/testing.md). pytest-xdist hands out whole files in
# collection order (tests/suite.py: `--dist loadfile --no-loadscope-reorder`): the long ones
# first, the short ones fill in at the end, so that no core sits idle while one process
# finishes a long file. The order only moves files; one missing here runs after them.
LONGEST_FIRST = [  # the first pass (not `serial`)
    "tests/test_fault_tolerance.py",  # 134 s
    "tests/test_cli.py",  # 116
    "tests/test_real_data_runs.py",  # 108
    "tests/test_matrix.py",  # 104: one pool of workers runs every combination
    "tests/test_run_folder.py",  # 67
    "tests/test_ray.py",  # 61 in run R: one Ray start (docs/performance.md)
    "tests/test_doctor.py",  # 51
    "tests/test_folder_finetune.py",  # 51
    "tests/test_sharding.py",  # 44 alone (19:40 UTC), its runs on forked workers since run S
    "tests/test_k8s_contract.py",  # 43
    "tests/test_compare.py",  # 41
    "tests/test_monitoring.py",  # 33 alone, as test_sharding
]
LONGEST_FIRST_SERIAL = [  # the second pass (`serial`)
    "tests/test_fault_tolerance.py",  # 66 s
    "tests/test_preemption.py",  # 57
    "tests/test_signals.py",  # 50
    "tests/test_slurm_real.py",  # 46
    "tests/test_elastic.py",  # 32
    "tests/test_gpu_check.py",  # 15
]


@pytest.hookimpl(tryfirst=True)  # before `-m compat` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in COMPAT_FILES:
            item.add_marker(pytest.mark.compat)
    # Stable: a file's own tests keep their order. Every xdist process sorts alike.
    items.sort(key=_longest_first)


def _longest_first(item: pytest.Item) -> tuple[bool, int]:
    serial = item.get_closest_marker("serial") is not None
    order = LONGEST_FIRST_SERIAL if serial else LONGEST_FIRST
    path = item.nodeid.split("::")[0]  # tests/test_cli.py: tests/unit/ has files of the same names
    return serial, order.index(path) if path in order else len(order)


@pytest.fixture(scope="session")
def one_process_reference(tmp_path_factory):
    """One process, no synchronization at all, trained with `PARITY_RUN`: the parameters every
    parallel path must reach (test_paths.py, test_distributed.py). One run per session."""
    from tests.helpers import PARITY_RUN, run_single
    from tests.workers import train_and_return_params

    run_dir = tmp_path_factory.mktemp("one-process-reference")
    return run_single(train_and_return_params, [*PARITY_RUN, f"run.dir={run_dir}"])


@pytest.fixture(scope="session")
def plain_runs(tmp_path_factory) -> list:
    """Two runs of the default config on small data, 8 steps (2 epochs, the second partial):
    2 gloo workers, and 1, through the workers' entry point (`train.worker.train`) in
    processes forked from the harness's server (no launcher and no interpreter per run: the run
    folder is the workers' work). For tests that only read what a plain run leaves
    (test_plot.py, test_profile.py); one pair per session."""
    from tests.helpers import run_distributed, small_run
    from tests.workers import train_and_return_state

    root = tmp_path_factory.mktemp("plain-runs")
    made = []
    for name, workers in (("two-workers", 2), ("one-worker", 1)):
        run_distributed(train_and_return_state, workers,
                        small_run(root / name, "train.max_steps=8"))
        made.append(root / name)
    return made
