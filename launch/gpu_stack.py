"""GPUs on this machine that this torch cannot use, and why, in one line.

A CPU-only torch, or one built for a newer CUDA than the driver runs, sees no GPU: the launcher
would fall back to CPU workers beside idle GPUs (requirements.txt's torch 2.14.1 needs a CUDA 13
driver). So when torch sees none, the driver is asked directly, without torch: `nvidia-smi`
(found on PATH) says the driver's version and the newest CUDA it runs; without nvidia-smi, the
device nodes (/dev/nvidia0, ...) and /proc/driver/nvidia/version show the GPUs and the driver.

Tests point the probes elsewhere: PATH (a stand-in nvidia-smi), DPTRAIN_DEV_DIR (a folder of
stand-in device nodes) and DPTRAIN_NVIDIA_PROC (a stand-in of the driver's version file).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from common.torch_support import version_tuple

DEV_DIR_ENV = "DPTRAIN_DEV_DIR"
PROC_ENV = "DPTRAIN_NVIDIA_PROC"
PROC_VERSION = "/proc/driver/nvidia/version"
WHEEL_INDEX = "https://download.pytorch.org/whl/"
HOW_TO = "docs/gpu.md#installing-torch-for-your-driver"
SMI_TIMEOUT_S = 30  # nvidia-smi takes seconds on a machine with many GPUs in persistence off
# The oldest Linux driver of each CUDA release (CUDA's release notes): what a driver runs when
# no nvidia-smi says it. Newest first.
DRIVER_CUDA = (((580, 65, 6), "13.0"), ((575, 51, 3), "12.9"), ((570, 26), "12.8"),
               ((560, 28, 3), "12.6"), ((555, 42, 2), "12.5"), ((550, 54, 14), "12.4"),
               ((545, 23, 6), "12.3"), ((535, 54, 3), "12.2"), ((530, 30, 2), "12.1"),
               ((525, 60, 13), "12.0"), ((520, 61, 5), "11.8"))


@dataclass(frozen=True)
class Driver:
    """The NVIDIA driver as the machine shows it, torch aside."""

    shown_by: str  # "nvidia-smi" or the device nodes found
    version: str | None  # the driver's, e.g. "550.54.15"
    cuda: str | None  # the newest CUDA it runs, e.g. "12.4"

    def __str__(self) -> str:
        version = f"driver {self.version}" if self.version else "driver version unknown"
        cuda = f"CUDA {self.cuda}" if self.cuda else "its CUDA version unknown"
        return f"{version}, {cuda}; seen by {self.shown_by}"


def device_nodes(env: Mapping[str, str] = os.environ) -> list[str]:
    """The GPUs' device nodes (nvidia0, nvidia1, ...; not nvidiactl or nvidia-uvm)."""
    folder = Path(env.get(DEV_DIR_ENV) or "/dev")
    try:
        names = [p.name for p in folder.iterdir() if re.fullmatch(r"nvidia\d+", p.name)]
    except OSError:
        return []
    return sorted(names, key=lambda name: int(name[len("nvidia"):]))


def parse_smi(text: str) -> tuple[str | None, str | None]:
    """(driver version, CUDA version) from nvidia-smi's header."""
    driver = re.search(r"Driver Version:\s*([0-9][0-9.]*)", text)
    cuda = re.search(r"CUDA Version:\s*([0-9]+\.[0-9]+)", text)
    return (driver.group(1) if driver else None), (cuda.group(1) if cuda else None)


def parse_proc_version(text: str) -> str | None:
    """The driver version in /proc/driver/nvidia/version ("... Kernel Module  550.54.15 ...")."""
    found = re.search(r"Kernel Module(?: for [\w-]+)?\s+([0-9]+\.[0-9]+(?:\.[0-9]+)?)", text)
    return found.group(1) if found else None


def cuda_of_driver(version: str | None) -> str | None:
    """The newest CUDA a driver version runs (DRIVER_CUDA), None when unknown or older."""
    if not version:
        return None
    have = version_tuple(version)
    return next((cuda for oldest, cuda in DRIVER_CUDA if have >= oldest), None)


def probe_driver(env: Mapping[str, str] = os.environ) -> Driver | None:
    """The driver and its GPUs; None when the machine shows none. nvidia-smi, when there is
    one, answers for the machine: no device found (a job given no GPU), or a driver that does
    not load, is no GPU torch could use either."""
    smi = shutil.which("nvidia-smi", path=env.get("PATH", os.defpath))
    if smi:
        try:
            done = subprocess.run([smi], capture_output=True, text=True, timeout=SMI_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError):
            return None
        version, cuda = parse_smi(done.stdout)
        if done.returncode != 0 or not (version or cuda):
            return None
        return Driver("nvidia-smi", version, cuda or cuda_of_driver(version))
    nodes = device_nodes(env)
    if not nodes:
        return None
    try:
        version = parse_proc_version(Path(env.get(PROC_ENV) or PROC_VERSION).read_text())
    except OSError:
        version = None
    folder = env.get(DEV_DIR_ENV) or "/dev"
    return Driver(", ".join(f"{folder}/{n}" for n in nodes), version, cuda_of_driver(version))


def wheel_index(cuda: str) -> str:
    """PyTorch's wheel index for a CUDA version: "12.4" -> .../whl/cu124."""
    major, minor = cuda.split(".")[:2]
    return f"{WHEEL_INDEX}cu{major}{minor}"


def mismatch_line(driver: Driver, torch_version: str, torch_cuda: str | None,
                  torchvision_version: str | None, visible: str | None = None) -> str:
    """Why torch sees none of the driver's GPUs and what to do, in one line: the driver's side,
    the build's side, the fix. `visible`: CUDA_VISIBLE_DEVICES."""
    base = torch_version.split("+")[0]
    pair = f"torch=={base}" + (f" torchvision=={torchvision_version.split('+')[0]}"
                               if torchvision_version else "")
    driver_cuda = driver.cuda
    if torch_cuda is None:
        build = "it is a CPU-only build"
    elif driver_cuda and version_tuple(driver_cuda) < version_tuple(torch_cuda):
        build = f"it is built for CUDA {torch_cuda}, newer than the driver's {driver_cuda}"
    elif driver_cuda:
        return (f"this machine has GPUs ({driver}) but torch {torch_version} (CUDA {torch_cuda}) "
                f"sees none of them, though the driver runs its CUDA: check that this process may "
                f"open the device nodes, and CUDA_VISIBLE_DEVICES ({visible!r}); `python -c "
                f"'import torch; torch.cuda.init()'` says why; --cpu trains on CPU workers")
    else:
        build = f"it is built for CUDA {torch_cuda}, and the driver's CUDA version is unknown"
    index = wheel_index(driver_cuda) if driver_cuda else f"{WHEEL_INDEX}cu12X"
    wanted = f"CUDA {driver_cuda} or older" if driver_cuda else "the driver's CUDA (nvidia-smi)"
    return (f"this machine has GPUs ({driver}) but torch {torch_version} cannot use them: "
            f"{build}. Install a torch built for {wanted}: `pip install {pair} --index-url "
            f"{index}` (or `make venv TORCH_INDEX={index}`; {HOW_TO}), or pass --cpu to train "
            f"on CPU workers")


def unusable_gpus(env: Mapping[str, str] = os.environ) -> str | None:
    """The line above when the machine has GPUs; None when it shows none, or when
    CUDA_VISIBLE_DEVICES hides them all on purpose ("" or -1). Call it when torch sees none."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return None
    driver = probe_driver(env)
    if driver is None:
        return None
    import torch

    try:
        torchvision = metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        torchvision = None
    return mismatch_line(driver, str(torch.__version__), torch.version.cuda, torchvision, visible)


def behind_line(driver: Driver, torch_cuda: str | None) -> str | None:
    """torch sees the GPUs, but its CUDA is newer than the driver's: it runs under CUDA's
    minor version compatibility (same major version), where code that needs the PTX compiled
    at run time (a GPU newer than the build's kernels, some compiled extensions) fails."""
    if not (driver.cuda and torch_cuda) or version_tuple(driver.cuda) >= version_tuple(torch_cuda):
        return None
    return (f"the driver runs CUDA {driver.cuda}, older than this torch's CUDA {torch_cuda}: "
            f"it runs under CUDA's minor version compatibility, without kernels compiled at run "
            f"time from PTX; a torch for CUDA {driver.cuda} ({wheel_index(driver.cuda)}) or a "
            f"newer driver avoids that")


def driver_behind(env: Mapping[str, str] = os.environ) -> str | None:
    """The line above for this machine (the doctor asks, when torch sees GPUs)."""
    driver = probe_driver(env)
    if driver is None:
        return None
    import torch

    return behind_line(driver, torch.version.cuda)
