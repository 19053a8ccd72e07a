"""GPUs that torch cannot use (launch/gpu_stack.py): what the driver says, the one line that
names both sides and the fix, and the launcher's and the doctor's verdicts on it.

No GPU is needed: the driver is stood in for by a folder of device nodes and a copy of its
version file (this tier starts no process, so nvidia-smi's stand-in is tested in
tests/test_cli.py), and the torch is this venv's own, which sees no GPU here; that is the
honest stand-in for a torch that cannot use the machine's GPUs (a CPU-only build, or a CUDA 13
build on a CUDA 12 driver: the same `torch.cuda.is_available() == False`)."""

from __future__ import annotations

import pytest
import torch

from common.errors import UserError
from launch.checks import CHECKS, FAIL, OK, run_check
from launch.cli import parse_args
from launch.gpu_stack import (
    DEV_DIR_ENV,
    PROC_ENV,
    Driver,
    behind_line,
    cuda_of_driver,
    device_nodes,
    mismatch_line,
    parse_proc_version,
    parse_smi,
    unusable_gpus,
)
from launch.job import plan_job
from launch.plan import make_plan
from tests.helpers import REPO

CONFIG = str(REPO / "configs" / "default.yaml")
SMI_HEADER = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
"""
PROC_TEXT = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 "
             "UTC 2023\nGCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
OLD_DRIVER = Driver("nvidia-smi", "550.54.15", "12.4")


def test_the_driver_says_its_version_and_cuda():
    assert parse_smi(SMI_HEADER) == ("550.54.15", "12.4")
    assert parse_smi("No devices were found") == (None, None)
    assert parse_proc_version(PROC_TEXT) == "535.104.05"
    open_module = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release"
    assert parse_proc_version(open_module) == "580.65.06"
    # CUDA's release notes: the oldest driver of each release
    assert cuda_of_driver("535.104.05") == "12.2"
    assert cuda_of_driver("550.54.14") == "12.4" and cuda_of_driver("550.40.07") == "12.3"
    assert cuda_of_driver("580.65.06") == "13.0"
    assert cuda_of_driver("470.57.02") is None and cuda_of_driver(None) is None


def test_device_nodes_are_the_gpus_only(tmp_path):
    for name in ("nvidia10", "nvidia1", "nvidia0", "nvidiactl", "nvidia-uvm", "nvidia-caps"):
        (tmp_path / name).touch()
    assert device_nodes({DEV_DIR_ENV: str(tmp_path)}) == ["nvidia0", "nvidia1", "nvidia10"]
    assert device_nodes({DEV_DIR_ENV: str(tmp_path / "absent")}) == []


@pytest.mark.parametrize("torch_cuda, driver, says", [
    (None, OLD_DRIVER, "it is a CPU-only build. Install a torch built for CUDA 12.4 or older"),
    ("13.0", OLD_DRIVER, "built for CUDA 13.0, newer than the driver's 12.4"),
    ("12.6", Driver("/dev/nvidia0", "535.104.05", "12.2"), "newer than the driver's 12.2"),
    ("12.6", Driver("/dev/nvidia0", None, None), "the driver's CUDA version is unknown"),
])
def test_the_line_names_both_sides_and_the_wheel_index(torch_cuda, driver, says):
    line = mismatch_line(driver, "2.14.1+cu130", torch_cuda, "0.29.1+cu130")
    assert "\n" not in line and says in line
    assert f"this machine has GPUs ({driver}) but torch 2.14.1+cu130 cannot use them" in line
    index = (f"https://download.pytorch.org/whl/cu{driver.cuda.replace('.', '')}" if driver.cuda
             else "https://download.pytorch.org/whl/cu12X")
    assert f"pip install torch==2.14.1 torchvision==0.29.1 --index-url {index}" in line
    assert line.endswith("or pass --cpu to train on CPU workers")


def test_a_build_the_driver_runs_that_still_sees_nothing_points_elsewhere():
    line = mismatch_line(Driver("nvidia-smi", "580.65.06", "13.0"), "2.14.1", "12.8", None,
                         visible="7")
    assert "torch 2.14.1 (CUDA 12.8) sees none of them, though the driver runs its CUDA" in line
    assert "CUDA_VISIBLE_DEVICES ('7')" in line and "--index-url" not in line


def test_a_driver_behind_a_build_that_still_runs_is_a_warning_line():
    """torch sees the GPUs (CUDA minor version compatibility): the doctor warns, nothing stops.
    Only the line is checked here: the doctor's row needs a GPU that torch sees."""
    line = behind_line(Driver("nvidia-smi", "550.54.15", "12.4"), "12.8")
    assert line.startswith("the driver runs CUDA 12.4, older than this torch's CUDA 12.8")
    assert "https://download.pytorch.org/whl/cu124" in line
    assert behind_line(Driver("nvidia-smi", "570.86.10", "12.8"), "12.8") is None
    assert behind_line(Driver("nvidia-smi", "580.65.06", "13.0"), "12.8") is None
    assert behind_line(Driver("/dev/nvidia0", None, None), "12.8") is None


@pytest.fixture
def gpus_torch_cannot_use(tmp_path, monkeypatch):
    """A machine whose driver shows two GPUs (driver 535.104.05: CUDA 12.2), and no nvidia-smi
    on PATH (so nothing is started); skipped where this torch does see a GPU."""
    if torch.cuda.is_available():
        pytest.skip("this torch sees a GPU: it cannot stand in for one that cannot")
    dev, bin_dir = tmp_path / "dev", tmp_path / "bin"
    dev.mkdir()
    bin_dir.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidiactl"):
        (dev / name).touch()
    (tmp_path / "version").write_text(PROC_TEXT)
    monkeypatch.setenv(DEV_DIR_ENV, str(dev))
    monkeypatch.setenv(PROC_ENV, str(tmp_path / "version"))
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # conftest.py hides the GPUs
    return dev


def test_the_launcher_and_the_doctor_stop_on_gpus_torch_cannot_use(gpus_torch_cannot_use,
                                                                   tmp_path):
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    dev = gpus_torch_cannot_use
    args = parse_args([CONFIG, f"run.dir={tmp_path / 'run'}"])
    verdict, detail = run_check(CHECKS["GPUs"], plan_job(args, dry=True))  # the doctor's row
    assert verdict == FAIL
    assert detail.startswith(f"this machine has GPUs (driver 535.104.05, CUDA 12.2; seen by "
                             f"{dev}/nvidia0, {dev}/nvidia1) but torch {torch.__version__}")
    assert build in detail and "--index-url https://download.pytorch.org/whl/cu122" in detail
    with pytest.raises(UserError) as refused:  # the launcher: its first check
        make_plan(args)
    assert str(refused.value) == detail
    assert not (tmp_path / "run").exists()


def test_cpu_workers_asked_for_or_gpus_hidden_on_purpose_train_on_the_cpu(
        gpus_torch_cannot_use, tmp_path, monkeypatch):
    for argv in (["--cpu", CONFIG], [CONFIG, "dist.device=cpu"]):
        job = plan_job(parse_args([*argv, f"run.dir={tmp_path / 'run'}"]), dry=True)
        assert job.problem is None and job.kind == "cpu"
        assert run_check(CHECKS["GPUs"], job)[0] == OK
    assert unusable_gpus() is not None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert unusable_gpus() is None
    job = plan_job(parse_args([CONFIG, f"run.dir={tmp_path / 'run'}"]), dry=True)
    assert job.problem is None and job.note.startswith("no GPU visible")
