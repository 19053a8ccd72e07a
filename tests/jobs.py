"""A launcher (or a worker) running in the background, as a user's job: its output lines as they
come, with the moment each came, and its processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from pathlib import Path

import psutil

from tests.helpers import PYTHON, REPO

CONFIG = str(REPO / "configs" / "default.yaml")
# 12 steps per epoch, 4 epochs, a few seconds on 2 CPU workers.
RUN = ["data.synthetic.train_samples=1536", "data.synthetic.test_samples=301",
       "train.batch_size=128", "train.epochs=4", "wandb.mode=disabled", "log.every_steps=1"]


class Job:
    """`python -m <module> ...` started now; `lines` fill in from both streams."""

    def __init__(self, *args: str, module: str = "launch", new_session: bool = False,
                 env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(
            [PYTHON, "-m", module, *args], cwd=REPO, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=new_session,
            env={**os.environ, "PYTHONPATH": str(REPO), "WANDB_API_KEY": "",
                 "NETRC": os.devnull, **(env or {})})
        self.lines: dict[str, list[tuple[float, str]]] = {"out": [], "err": []}
        self._readers = [threading.Thread(target=self._read, args=(stream, name), daemon=True)
                         for stream, name in ((self.proc.stdout, "out"),
                                              (self.proc.stderr, "err"))]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, name: str) -> None:
        for line in stream:
            self.lines[name].append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, text: str, stream: str = "out", timeout: float = 120) -> float:
        """Until a line containing `text` came; the moment it came."""
        deadline = time.monotonic() + timeout
        while True:
            for when, line in list(self.lines[stream]):
                if text in line:
                    return when
            assert self.proc.poll() is None, f"ended without a line with {text!r}:\n{self.output()}"
            assert time.monotonic() < deadline, f"no line with {text!r}:\n{self.output()}"
            time.sleep(0.05)

    def wait_for_file(self, pattern: Path, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not list(pattern.parent.glob(pattern.name)):
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, f"no {pattern} appeared"
            time.sleep(0.02)

    def catches(self, sig: int, timeout: float = 30) -> None:
        """Until the process has a handler for `sig` (its first lines have run)."""
        deadline = time.monotonic() + timeout
        while not catches(self.proc.pid, sig):
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, f"no handler for signal {sig}"
            time.sleep(0.01)

    def workers(self, count: int = 1, timeout: float = 60) -> list[psutil.Process]:
        """Its child processes, once there are at least `count`."""
        deadline = time.monotonic() + timeout
        while len(children := psutil.Process(self.proc.pid).children(recursive=True)) < count:
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, "the workers never started"
            time.sleep(0.01)
        return children

    def finish(self, timeout: float = 180) -> int:
        code = self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return code

    def err(self) -> list[str]:
        """Its non-empty stderr lines."""
        return [line for _, line in self.lines["err"] if line.strip()]

    def out(self) -> str:
        return "\n".join(line for _, line in self.lines["out"])

    def output(self) -> str:
        return self.out() + "\n" + "\n".join(line for _, line in self.lines["err"])

    def kill_all(self) -> None:
        """Never leave a process behind, whatever the test found."""
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                child.kill()
        self.proc.kill()


def catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (Linux: SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def gone_within(processes: list[psutil.Process], seconds: float) -> bool:
    _, alive = psutil.wait_procs(processes, timeout=seconds)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    return not alive


@contextlib.contextmanager
def running(*args: str, **kwargs) -> Job:
    job = Job(*args, **kwargs)
    try:
        yield job
    finally:
        if job.proc.poll() is None:
            job.kill_all()
        job.proc.wait()
