"""`make train` stopped mid-run: what make returns. Ctrl-C in a terminal signals the whole
foreground group; make waits for the launcher (which checkpoints and exits 130) and then ends
by the same signal, so the shell's `$?` is 130. A signal to the launcher alone comes back from
make as its own code 2 (`Error 130` named in its message): make has no way to pass on another."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import psutil
import pytest

from tests.helpers import REPO
from tests.jobs import RUN

pytestmark = pytest.mark.slow


def terminal_signals() -> None:
    """A shell starts a foreground job with the stop signals at their defaults, unblocked,
    whatever this test process has done with its own (make keeps a SIGINT it finds ignored
    ignored, and then exits 2 after its child's 130 instead of ending by the signal)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def signal_masks(pid: int) -> str:
    """The kernel's view of a process's signals (ignored, blocked, caught), for a failure."""
    with open(f"/proc/{pid}/status") as status:
        return " ".join(line.strip() for line in status if line.startswith(("SigIgn",
                                                                           "SigBlk",
                                                                           "SigCgt")))


def start_make_train(run_dir) -> tuple[subprocess.Popen, list[str]]:
    """`make train` in a session of its own, as a terminal runs it; `-o` keeps make from
    rebuilding the venv (here a link to a shared one); stdout lines collected as they come.
    One worker: what is checked is make's exit code (two workers stopping at one step boundary
    on a Ctrl-C to the group: test_fault_tolerance.py)."""
    args = " ".join([*RUN, "train.epochs=50", f"run.dir={run_dir}"])
    proc = subprocess.Popen(["make", "-s", "-o", ".venv/.installed", "train", "GPUS=1",
                             f"ARGS={args}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=terminal_signals,
                            env={**os.environ, "WANDB_API_KEY": "", "NETRC": os.devnull,
                                 "CUDA_VISIBLE_DEVICES": ""})
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.monotonic() + 180
    while not any("step 3/" in line for line in lines):
        assert proc.poll() is None, "".join(lines) + proc.stderr.read()
        assert time.monotonic() < deadline, "".join(lines)
        time.sleep(0.05)
    return proc, lines


@pytest.mark.parametrize("whom", ["the terminal's group", "the launcher alone"])
def test_make_train_stopped_by_sigint(tmp_path, whom):
    proc, _ = start_make_train(tmp_path / "run")
    masks = signal_masks(proc.pid)
    if whom == "the terminal's group":
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does
    else:
        [launcher] = [p for p in psutil.Process(proc.pid).children() if "launch" in p.cmdline()]
        launcher.send_signal(signal.SIGINT)
    code = proc.wait(timeout=120)
    err = proc.stderr.read()
    assert "train] Error 130" in err  # the launcher's own code, named by make
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()  # stopped with a checkpoint
    if whom == "the terminal's group":
        # ended by SIGINT: a shell's $? is 128 + 2 = 130
        assert code == -signal.SIGINT, f"make {masks}: {err}"
    else:
        assert code == 2  # make's own code: it has no other to give


def make_dry_run(*args: str) -> list[str]:
    """The commands `make -n` would run, in a venv folder that does not exist."""
    # Under `make test` the outer make's MAKELEVEL/MAKEFLAGS reach this one, which would then
    # print "Entering directory" lines: --no-print-directory keeps the output the commands.
    result = subprocess.run(["make", "--no-print-directory", "-n", *args,
                             "VENV=/nonexistent/venv"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_your_own_python_runs_the_targets_without_a_venv():
    """`make train PY=python3`: an environment the user made (their torch) runs the target;
    no venv is built. Without PY the venv comes first; TORCH_INDEX takes torch and torchvision
    from PyTorch's wheel index at requirements.txt's versions, before the rest; without it,
    requirements.lock comes before requirements.txt."""
    for target in ("train", "doctor", "eval", "test-fast"):
        commands = make_dry_run(target, "PY=python3", "RUN=runs/x")
        assert commands and all(c.startswith("python3 -m ") for c in commands), commands
    commands = make_dry_run("train")
    assert "-m venv /nonexistent/venv" in commands[0]
    assert commands[-1].startswith("/nonexistent/venv/bin/python -m launch")
    index = "https://download.pytorch.org/whl/cu126"
    commands = make_dry_run("venv", f"TORCH_INDEX={index}")
    [first] = [c for c in commands if "--index-url" in c]
    assert first.startswith(f"/nonexistent/venv/bin/pip install --quiet --quiet --index-url "
                            f"{index} $(grep -E '^torch(vision)?==' requirements.txt)")
    resolve = "/nonexistent/venv/bin/pip install --quiet --quiet -r requirements.txt"
    assert commands.index(first) < commands.index(resolve)
    assert not any("locked_install" in c for c in commands)  # the lock is PyPI's torch
    commands = make_dry_run("venv")  # requirements.lock first, then what it left out
    assert not any("--index-url" in c for c in commands)
    locked = next(i for i, c in enumerate(commands) if c.endswith(
        "-m tools.locked_install /nonexistent/venv"))
    assert locked < commands.index(resolve)
