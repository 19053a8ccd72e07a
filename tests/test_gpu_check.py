"""`make gpu-check`'s part runner and report: each part in a process (and session) of its own;
a part that fails, crashes or overruns is reported and the next one runs, and one that overruns
is killed with everything it started; parts that need a GPU are skipped on a machine without
one; the CPU dry run runs every part's CPU form, on the GPU machine's torch (CI's torch-2.11
tier)."""

import json
import os
import subprocess
import time

import pytest
import torch

from common.torch_support import version_tuple
from tests.helpers import PYTHON, REPO, pinned
from tools.gpu_check import FAIL, PASS, SKIP, Context, Part, run_parts, write_report
from tools.gpu_check.group import run_group

# The tests that time a kill at a deadline, and the environment part's 20 s budget, run away
# from the CPU-bound tests (`serial`). The dry run's budgets are three times a GPU's, several
# times what its parts take here on busy cores: it runs in the first pass.

HERE = "tests.gpu_check_parts"
# The dry run proves gpu-check's parts run on the torch of the machine it is for, the tier that
# pins that torch (requirements-torch211.txt, CI's second tier). On another torch it would prove
# nothing about that machine and cost a minute of the suite's two cores (29 interpreters).
GPU_MACHINE_TORCH = pinned("torch", "requirements-torch211.txt")


def test_a_failing_part_is_reported_and_the_next_one_runs(tmp_path):
    parts = [Part("crashes", f"{HERE}:crashes", 60, needs_gpu=False),
             Part("fails", f"{HERE}:fails", 60, needs_gpu=False),
             Part("passes", f"{HERE}:passes", 60, needs_gpu=False),
             Part("needs a GPU", f"{HERE}:passes", 60)]
    lines = []
    results = run_parts(parts, Context(0, tmp_path), total_s=600, say=lines.append)
    assert [r.status for r in results] == [FAIL, FAIL, PASS, SKIP]
    assert "crashed: RuntimeError: CUDA error: an illegal memory access" in results[0].detail
    assert "dry False" in results[2].detail and int(results[2].detail.split()[1]) <= 60
    assert "no GPU visible" in results[3].detail
    assert any(line.startswith("gpu-check [1/4] crashes: FAIL") for line in lines)  # progress

    report = write_report(results, {"torch": "2.11.0", "NCCL": "2.27.3"}, tmp_path).read_text()
    assert "1 passed, 2 failed, 1 skipped" in report
    assert "| torch | 2.11.0 |" in report and "| NCCL | 2.27.3 |" in report
    assert "| fails | FAIL |" in report and "| needs a GPU | SKIP |" in report
    assert "| bytes | ms |" in report and "- algbw GB/s: 12.5" in report
    assert "## What one GPU cannot prove" in report
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [p["status"] for p in saved["parts"]] == [FAIL, FAIL, PASS, SKIP]


@pytest.mark.serial  # bounds its time: away from the CPU-bound tests (tests/suite.py)
def test_a_part_past_its_deadline_is_killed_with_what_it_started(tmp_path):
    """The part hangs and leaves a grandchild in a session of its own: at the part's
    deadline both are gone before the next part starts (a worker left over would hold the
    GPU), and the part's last output is in its FAIL."""
    parts = [Part("overruns", f"{HERE}:overruns_leaving_a_grandchild", 8, needs_gpu=False),
             Part("next", f"{HERE}:passes", 60, needs_gpu=False)]
    seen_at_next = []

    def say(line):
        if line.startswith("gpu-check [2/2] next ..."):
            pid = int((tmp_path / "grandchild.pid").read_text())
            seen_at_next.append(_alive(pid))

    started = time.monotonic()
    results = run_parts(parts, Context(0, tmp_path), total_s=600, say=say)
    assert [r.status for r in results] == [FAIL, PASS]
    assert "ran past its budget (8 s)" in results[0].detail
    assert "now hanging" in results[0].detail  # its output, read up to the kill
    assert seen_at_next == [False]
    assert time.monotonic() - started < 8 + 60  # killed at the deadline, not at the child's end


@pytest.mark.serial  # bounds its time: away from the CPU-bound tests (tests/suite.py)
def test_a_command_past_its_deadline_ends_with_its_whole_group():
    """A launch inside a part: its own process group and its tree (torchrun's workers have
    sessions of their own) ended whole: SIGTERM, then SIGKILL."""
    script = ("import subprocess, sys, time; "
              "p = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
              "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'], "
              "start_new_session=True); "
              "print(p.pid, flush=True); time.sleep(600)")
    done = run_group([PYTHON, "-c", script], 5)
    assert done.timed_out and done.returncode is None
    grandchild = int(done.output.split()[0])
    assert not _alive(grandchild)  # it ignored SIGTERM: SIGKILL ended it


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.serial  # bounds its time: away from the CPU-bound tests (tests/suite.py)
def test_make_gpu_check_without_a_gpu_skips_every_gpu_part(tmp_path):
    """What `make gpu-check PY=.venv/bin/python` does here: no crash, every GPU part a SKIP,
    versions named (the test process hides the GPUs, so this holds on GPU machines too)."""
    result = subprocess.run([PYTHON, "-m", "tools.gpu_check", "--out", str(tmp_path)], cwd=REPO,
                            text=True, capture_output=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    saved = json.loads((tmp_path / "report.json").read_text())
    assert {"torch", "CUDA", "NCCL", "GPUs"} <= saved["facts"].keys()
    statuses = {p["name"]: p["status"] for p in saved["parts"]}
    assert statuses.pop("torch on this machine") == PASS
    assert set(statuses.values()) == {SKIP} and len(statuses) == 6
    assert "gpu-check [6/6] torch.compile with DDP: SKIP" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(version_tuple(torch.__version__) != version_tuple(GPU_MACHINE_TORCH),
                    reason=f"the GPU machine's torch ({GPU_MACHINE_TORCH}) only: CI's torch-2.11 "
                    "tier runs it (make test-torch211)")
@pytest.mark.timeout(900)  # about 2 minutes on two idle cores; several times that on busy ones
def test_the_cpu_dry_run_runs_every_part(tmp_path):
    """`python -m tools.gpu_check --cpu-dry-run`: each part's commands, checks and figures in
    their CPU form (what breaks them on the GPU machine's torch breaks them here), nothing
    skipped, nothing left running, a report line per check."""
    result = subprocess.run([PYTHON, "-m", "tools.gpu_check", "--cpu-dry-run", "--out",
                             str(tmp_path)], cwd=REPO, text=True, capture_output=True,
                            timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["dry_run"] and len(saved["parts"]) == 7
    assert {p["name"]: p["status"] for p in saved["parts"] if p["status"] != PASS} == {}
    figures = {p["name"]: p["figures"] for p in saved["parts"]}
    speed = figures["ResNet-50 bf16, batch 256"]
    assert speed["images/s"] > 0 and speed["peak memory MiB"] >= 0 and "data wait %" in speed
    assert figures["memory path + augmentation: SIGTERM, resume bitwise"][
        "bitwise equal to the reference"] is True
    report = (tmp_path / "report.md").read_text()
    assert report.count("| PASS |") == 7 and "CPU dry run" in report
    assert not _running_in(tmp_path)


def _running_in(folder) -> list[str]:
    """Command lines of live processes that name `folder` (every launch names its run.dir)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _alive(int(entry)):
            try:
                line = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(folder) in line:
                found.append(line)
    return found
