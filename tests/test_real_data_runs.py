"""Real data through the real command line: image folders and Python datasets trained by
several workers, and bad input found before any worker. The exact resume on the stream path,
its loader processes included, runs the workers' own `main` in gloo processes forked by the
harness (`tests.helpers.run_workers`): where a stop lands and what a resume reads are the
workers' alone."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.helpers import (
    PYTHON,
    REPO,
    environment,
    free_port,
    gpu_count,
    gpu_env,
    run_cli,
    run_workers,
)
from tests.inprocess import launcher_main, run_main
from tests.test_real_data import FACTORIES
from tests.unit.test_torchvision_data import write_mnist
from tools.make_images import write_image_folder

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "default.yaml")
# 96 images, global batch 16: 6 steps per epoch, 2 epochs; a SIGTERM after step 8 is agreed
# at step 10, four steps into the second epoch.
RUN = ["train.batch_size=16", "train.epochs=2", "train.eval_batch_size=8", "data.image_size=32",
       "wandb.mode=disabled", "log.every_steps=2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"), 96, 20, classes=3,
                              min_size=64, max_size=96)


def images(folder: Path, tmp: Path, *extra: str) -> list[str]:
    return ["data.name=imagefolder", f"data.root={folder}", f"data.cache_dir={tmp / 'cache'}",
            *RUN, *extra]


def params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("cache", ["none", "decoded"])
def test_an_image_folder_run_stopped_inside_an_epoch_resumes_bitwise(folder, tmp_path, cache):
    """Two workers, imagenet recipe, two loader processes each; the resumed half with one:
    neither the restart nor the number of loader processes changes a sample."""
    run = images(folder, tmp_path, "data.loader=stream", "data.augment=imagenet",
                 f"data.cache={cache}")
    whole = run_workers(2, CONFIG, *run, "data.num_workers=2", f"run.dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr
    assert "streamed (data.loader=stream): 2 loader process(es) per worker" in whole.stdout
    stopped_dir = tmp_path / "stopped"
    stopped = run_workers(2, CONFIG, *run, "data.num_workers=2", f"run.dir={stopped_dir}",
                          "debug.sigterm_rank=1", "debug.sigterm_step=8")
    assert stopped.returncode == 130, stopped.stderr
    saved = torch.load(stopped_dir / "checkpoints" / "last.pt", weights_only=True)
    assert (saved["step"], saved["batch_in_epoch"]) == (10, 4)
    assert saved["classes"] == {"names": ["class_00", "class_01", "class_02"]}
    again = run_workers(2, CONFIG, *run, "data.num_workers=1", f"run.dir={stopped_dir}")
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout
    ours, theirs = params(stopped_dir), params(tmp_path / "whole")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert json.loads((stopped_dir / "classes.json").read_text()) == saved["classes"]["names"]


def test_a_python_dataset_trains_with_the_same_loop(tmp_path):
    (tmp_path / "my_factories.py").write_text(FACTORIES)
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    result = run_cli("launch", "--cpu", CONFIG, "data.name=python",
                     "data.factory=my_factories:good", "data.image_size=16",
                     "train.batch_size=10", "train.epochs=2", "wandb.mode=disabled",
                     f"run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
                     env=env)
    assert result.returncode == 0, result.stderr
    assert "data python 3x16x16: 30 train / 7 test, 3 classes; in memory (auto" in result.stdout
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_samples"] for r in records] == [7, 7]  # each test sample once, 2 workers
    assert json.loads((tmp_path / "run" / "classes.json").read_text()) == ["a", "b", "c"]


def test_a_dataset_that_loader_processes_cannot_get_is_one_line(tmp_path):
    """Loader processes start from a forkserver (train/data/loader_server.py), not as forks of
    the threaded worker: the dataset travels pickled, and one that cannot is named once. The
    same dataset trains without loader processes."""
    (tmp_path / "my_factories.py").write_text(FACTORIES)
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    run = ["data.name=python", "data.factory=my_factories:unpicklable", "data.image_size=16",
           "train.batch_size=10", "train.epochs=1", "wandb.mode=disabled",
           "data.loader=stream", f"data.cache_dir={tmp_path / 'cache'}"]
    refused = run_cli("launch", "--cpu", CONFIG, *run, "data.num_workers=1",
                      f"run.dir={tmp_path / 'refused'}", env=env)
    assert refused.returncode == 2
    lines = error_lines(refused.stderr)
    assert len(lines) == 1, refused.stderr
    assert lines[0].startswith("error: the dataset cannot be sent to its loader processes (")
    assert "lambda" in lines[0] and lines[0].endswith("or set data.num_workers=0")
    alone = run_cli("launch", "--cpu", CONFIG, *run, "data.num_workers=0",
                    f"run.dir={tmp_path / 'alone'}", env=env)
    assert alone.returncode == 0, alone.stderr


# A worker with two loader processes that reads a batch and then ends as a failure or a stop
# ends it (no exit functions) or as SIGKILL (the kernel's OOM killer) does.
LEAVING_WORKER = """
import os, signal, torch
from multiprocessing import forkserver
from torch.utils.data import DataLoader, TensorDataset
from common.host import leave
from train.data.loader_server import loader_context, start_loader
loader = DataLoader(TensorDataset(torch.arange(64.0)), batch_size=4, num_workers=2,
                    multiprocessing_context=loader_context())
batches = start_loader(loader)
next(batches)
print(forkserver._forkserver._forkserver_pid, *(w.pid for w in batches._workers), flush=True)
os.kill(os.getpid(), signal.SIGKILL) if {killed} else leave(2, exit_functions=False)
"""


def _ended(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.compat  # the GPU machine's Python 3.12 has its own multiprocessing
@pytest.mark.parametrize("killed", [False, True], ids=["leaves at once", "SIGKILL"])
def test_a_worker_that_ends_at_once_takes_its_loader_processes_along_in_silence(killed):
    """The loader processes' server and the loader processes end with their worker, however
    it ends (train/data/loader_server.py): both ignore SIGTERM, and before they had the
    parent-death signal they lived on forever, holding the worker's output pipes, so that
    this run never returned. Nor does multiprocessing's resource tracker, which unlinks the
    queues' semaphores such a worker left, warn of them on the worker's stderr."""
    worker = subprocess.Popen([PYTHON, "-c", LEAVING_WORKER.format(killed=killed)], cwd=REPO,
                              env=environment({"PYTHONPATH": str(REPO)}), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        out, err = worker.communicate(timeout=120)  # until every holder of the pipes is gone
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)  # what a failure leaves, for the next tests
    pids = [int(pid) for pid in out.split()]
    assert len(pids) == 3 and worker.returncode == (-signal.SIGKILL if killed else 2), err
    assert err == ""
    deadline = time.monotonic() + 30
    while not all(_ended(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_ended(pid) for pid in pids), pids


def test_a_corrupt_file_met_in_training_is_one_line_or_skipped_and_counted(folder, tmp_path):
    """The launcher's one line, exit 2; then the same run continued by its workers alone
    (run_workers, `dist.device=cpu` as `launch --cpu` gives them), which skip and count."""
    copy = tmp_path / "images"
    shutil.copytree(folder, copy)
    bad = sorted((copy / "train" / "class_02").iterdir())[0]
    bad.write_bytes(bad.read_bytes()[:300])
    run = images(copy, tmp_path, "data.loader=stream", "data.num_workers=1", "train.epochs=1",
                 "data.normalize=false")
    stopped = run_cli("launch", "--cpu", CONFIG, *run, f"run.dir={tmp_path / 'stopped'}")
    assert stopped.returncode == 2
    lines = error_lines(stopped.stderr)
    assert len(lines) == 1 and f"cannot decode {bad} " in lines[0], stopped.stderr
    assert "data.skip_bad_files=true" in lines[0]
    skipped = run_workers(2, CONFIG, *run, "dist.device=cpu", f"run.dir={tmp_path / 'stopped'}",
                          "data.skip_bad_files=true")  # a runtime key: the same run continues
    assert skipped.returncode == 0, skipped.stderr
    record = json.loads((tmp_path / "stopped" / "metrics.jsonl").read_text())
    assert record["skipped_files"] == 1  # 96 images, 6 full batches: every image is met


def _bad_folder(tmp_path: Path, folder: Path, case: str) -> list[str]:
    root = tmp_path / "data"
    if case == "missing":
        return [f"data.root={root}"]
    shutil.copytree(folder, root)
    if case == "empty class":
        (root / "val" / "class_03").mkdir()
        (root / "train" / "class_03").mkdir()
    elif case == "different classes":
        shutil.move(root / "val" / "class_02", root / "val" / "class_09")
    return [f"data.root={root}"]


def _bad_folder_run(tmp_path: Path, folder: Path, case: str) -> list[str]:
    return ["data.name=imagefolder", *_bad_folder(tmp_path, folder, case), "wandb.mode=disabled",
            f"run.dir={tmp_path / 'run'}"]


BAD_FOLDERS = [
    ("missing", "data.root {tmp}/data is not a folder"),
    ("empty class", "class folder {tmp}/data/train/class_03 holds no images"),
    ("different classes", "only in train: class_02; only in val: class_09"),
]


@pytest.mark.parametrize("case, message", BAD_FOLDERS)
def test_a_bad_image_folder_is_one_line_before_any_worker(folder, tmp_path, monkeypatch, case,
                                                          message):
    """The launcher's main() in this process (tests/inprocess.py); the real commands follow."""
    run = _bad_folder_run(tmp_path, folder, case)
    result = run_main(launcher_main(monkeypatch), "--cpu", CONFIG, *run)
    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and message.format(tmp=tmp_path) in lines[0], result.stderr
    assert "worker" not in result.stdout and not (tmp_path / "run").exists()


def test_a_bad_image_folder_is_one_line_from_the_launcher_and_from_the_workers(folder, tmp_path):
    """The real command line, and workers without the launcher (run_workers, as torchrun
    starts them; they check the folder themselves): one line each, nothing written."""
    case, message = BAD_FOLDERS[-1]
    run = _bad_folder_run(tmp_path, folder, case)
    result = run_cli("launch", "--cpu", CONFIG, *run)
    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "worker" not in result.stdout and not (tmp_path / "run").exists()
    direct = run_workers(2, CONFIG, *run)
    assert direct.returncode == 2
    reported = [x for x in direct.stderr.splitlines() if x.strip()]
    assert len(reported) == 1 and message in reported[0], direct.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("spec, message", [
    ("nowhere:build", "data.factory nowhere:build: cannot import nowhere"),
    ("my_factories:not_callable", "data.factory my_factories:not_callable is not callable"),
    ("my_factories:one", "must return (train, test)"),
    ("my_factories:triple", "train sample 0 is a tuple of 3: Tensor, int, str, not an (image, "
                            "label) pair"),
])
def test_a_bad_data_factory_is_one_line_before_any_worker(tmp_path, monkeypatch, spec, message):
    """The launcher's main() in this process (tests/inprocess.py); one real command line
    follows."""
    (tmp_path / "my_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_factories", raising=False)
    result = run_main(launcher_main(monkeypatch), "--cpu", CONFIG, "data.name=python",
                      f"data.factory={spec}", f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_a_bad_data_factory_is_one_line_from_the_real_launcher(tmp_path):
    """Its module found through PYTHONPATH, as a user's would be."""
    (tmp_path / "my_factories.py").write_text(FACTORIES)
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    result = run_cli("launch", "--cpu", CONFIG, "data.name=python",
                     "data.factory=my_factories:triple", f"run.dir={tmp_path / 'run'}", env=env)
    message = "train sample 0 is a tuple of 3: Tensor, int, str, not an (image, label) pair"
    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def _idx_case(tmp_path: Path, case: str) -> Path:
    write_mnist(tmp_path, "MNIST")
    raw = tmp_path / "MNIST" / "raw"
    if case == "truncated":
        path = raw / "train-images-idx3-ubyte"
        path.write_bytes(path.read_bytes()[:1000])
    else:  # a file that is not IDX at all
        path = raw / "t10k-labels-idx1-ubyte"
        path.write_bytes(b"<html>404 not found</html>")
    return path


@pytest.mark.parametrize("case, message", [
    ("truncated", "{path} is truncated: 1,000 bytes for 40 x 28 x 28 values"),
    ("not idx", "{path} is not an IDX file of 1-dimensional unsigned bytes"),
])
def test_official_files_that_are_damaged_are_named_before_any_worker(tmp_path, monkeypatch, case,
                                                                    message):
    # The launcher's main() in this process (tests/inprocess.py).
    path = _idx_case(tmp_path, case)
    result = run_main(launcher_main(monkeypatch), "--cpu", CONFIG, "data.name=mnist",
                      f"data.root={tmp_path}", "data.download=false",
                      f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and message.format(path=path) in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def _unwritable(tmp_path: Path, case: str) -> tuple[Path, str, list[str]]:
    """(run.dir, the line's ending, a command prefix that makes its parent read-only)."""
    if case == "a file in the way":
        (tmp_path / "file").write_text("x")
        return tmp_path / "file" / "run", f"{tmp_path / 'file'} is not a folder", []
    if case == "under /proc":
        return Path("/proc/self/run"), "/proc/self is not writable", []
    parent = tmp_path / "read-only"
    parent.mkdir()
    if os.geteuid() != 0:
        parent.chmod(0o555)
        return parent / "run", f"{parent} is not writable", []
    # Root writes through permission bits: a read-only bind mount in a private mount namespace.
    mount = (f'mount --bind "{parent}" "{parent}" && '
             f'mount -o remount,bind,ro "{parent}" "{parent}" && exec "$@"')
    prefix = ["unshare", "-m", "sh", "-c", mount, "sh"]
    import subprocess

    if subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("root without mount namespaces here: no way to make a folder read-only")
    return parent / "run", f"{parent} is not writable", prefix


@pytest.mark.parametrize("case", ["a file in the way", "under /proc"])
def test_a_run_dir_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, case):
    """The launcher's main() in this process (tests/inprocess.py); the launcher and the workers
    ask the same function (`common/files.py: why_not_writable`), whose every answer the real
    commands below show once."""
    run_dir, ending, _ = _unwritable(tmp_path, case)
    result = run_main(launcher_main(monkeypatch), "--cpu", CONFIG, "wandb.mode=disabled",
                      f"run.dir={run_dir}", "train.max_steps=1")
    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert f"run.dir {run_dir} cannot be created or written: {ending}" in lines[0]


def test_a_read_only_run_dir_is_one_line_from_the_launcher_and_from_workers(tmp_path):
    """The real commands: the launcher, and workers that torchrun starts directly."""
    import subprocess
    import sys

    run_dir, ending, prefix = _unwritable(tmp_path, "a read-only parent")
    base = ["wandb.mode=disabled", f"run.dir={run_dir}", "train.max_steps=1"]
    # A temp folder of this test's own: other tests running beside it leave files in /tmp.
    private = tmp_path / "tmp"
    private.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_API_KEY": "", "TMPDIR": str(private)}
    # Workers without our launcher (pid 0 in the name) remove their stack-dump files even when
    # they leave at once with an error.
    dumps = lambda: set(private.glob("dptrain-fatal-0-*"))  # noqa: E731
    before = dumps()
    for command in (["-m", "launch", "--cpu", CONFIG, *base],
                    ["-m", "torch.distributed.run", "--nproc-per-node=2",
                     f"--master-port={free_port()}", "-m", "train", CONFIG, *base]):
        done = subprocess.run([*prefix, sys.executable, *command], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode != 0
        reported = [x for x in done.stderr.splitlines() if x.startswith("error: ")]
        assert len(reported) == 1, done.stderr
        assert f"run.dir {run_dir} cannot be created or written: {ending}" in reported[0]
        # torchrun's agent prints a traceback of its own ChildFailedError; none from workers
        assert f"{REPO / 'train'}" not in done.stderr, done.stderr
    assert dumps() <= before


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 1, reason="needs a GPU (CPU twin: "
                    "test_real_data.py::test_nvjpeg_decoding_code_renders_like_pil)")
def test_nvjpeg_decodes_an_image_folder_on_the_gpu(folder, tmp_path):
    run = images(folder, tmp_path, "data.loader=stream", "data.decoder=nvjpeg",
                 "data.augment=imagenet", "train.epochs=1", "dist.device=cuda")
    result = run_cli("launch", "--gpus", "1", CONFIG, *run, f"run.dir={tmp_path / 'gpu'}",
                     env=gpu_env(1))
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "gpu" / "metrics.jsonl").read_text())
    assert record["test_samples"] == 20 and record["skipped_files"] == 0
