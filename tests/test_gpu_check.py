"""`make gpu-check`'s part runner and report: a part that fails or crashes is reported and the
next one runs; parts that need a GPU are skipped on a machine without one; the report says it
all. (The parts themselves run on GPU machines; on this one `make gpu-check` skips them.)"""

import json
import subprocess
import time

from tests.helpers import PYTHON, REPO
from tools.gpu_check import FAIL, PASS, SKIP, Context, Outcome, Part, run_parts, write_report


def test_a_failing_part_is_reported_and_the_next_one_runs(tmp_path):
    ran = []

    def crashes(ctx):
        ran.append("crashes")
        raise RuntimeError("CUDA error: an illegal memory access")

    def fails(ctx):
        ran.append("fails")
        return Outcome(FAIL, "exit 1: boom")

    def passes(ctx):
        ran.append("passes")
        assert ctx.left_s() <= 10  # its own budget, not the whole one
        return Outcome(PASS, "fine", {"algbw GB/s": 12.5, "rows": [{"bytes": 1, "ms": 0.5}]})

    parts = [Part("crashes", crashes, 10, needs_gpu=False), Part("fails", fails, 10, False),
             Part("passes", passes, 10, needs_gpu=False), Part("needs a GPU", passes, 10)]
    lines = []
    results = run_parts(parts, Context(0, tmp_path, {}), total_s=60, say=lines.append)
    assert ran == ["crashes", "fails", "passes"]  # the GPU part never ran without a GPU
    assert [r.status for r in results] == [FAIL, FAIL, PASS, SKIP]
    assert "crashed: RuntimeError: CUDA error: an illegal memory access" in results[0].detail
    assert "no GPU visible" in results[3].detail
    assert any(line.startswith("gpu-check [1/4] crashes: FAIL") for line in lines)  # progress

    report = write_report(results, {"torch": "2.11.0", "NCCL": "2.27.3"}, tmp_path).read_text()
    assert "1 passed, 2 failed, 1 skipped" in report
    assert "| torch | 2.11.0 |" in report and "| NCCL | 2.27.3 |" in report
    assert "| fails | FAIL |" in report and "| needs a GPU | SKIP |" in report
    assert "| bytes | ms |" in report and "- algbw GB/s: 12.5" in report
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [p["status"] for p in saved["parts"]] == [FAIL, FAIL, PASS, SKIP]


def test_parts_past_the_budget_are_skipped_not_run(tmp_path):
    def slow(ctx):
        time.sleep(1.5)
        return Outcome(PASS, "slow")

    results = run_parts([Part("slow", slow, 30, False), Part("late", slow, 30, False)],
                        Context(0, tmp_path, {}), total_s=6, say=lambda line: None)
    assert [r.status for r in results] == [PASS, SKIP]
    assert "no time left of the 6 s budget" in results[1].detail


def test_make_gpu_check_without_a_gpu_skips_every_gpu_part(tmp_path):
    """What `make gpu-check PY=.venv/bin/python` does here: no crash, every GPU part a SKIP,
    versions named (the test process hides the GPUs, so this holds on GPU machines too)."""
    result = subprocess.run([PYTHON, "-m", "tools.gpu_check", "--out", str(tmp_path)], cwd=REPO,
                            text=True, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    saved = json.loads((tmp_path / "report.json").read_text())
    assert {"torch", "CUDA", "NCCL", "GPUs"} <= saved["facts"].keys()
    statuses = {p["name"]: p["status"] for p in saved["parts"]}
    assert statuses.pop("torch on this machine") == PASS
    assert set(statuses.values()) == {SKIP} and len(statuses) == 5
    assert "gpu-check [6/6] NCCL allreduce bandwidth: SKIP" in result.stdout
