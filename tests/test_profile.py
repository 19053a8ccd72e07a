"""`perf.profile_steps=A-B`: torch.profiler traces of those steps on every rank, the top
operators on the main rank's console, and the bad input."""

from __future__ import annotations

import json

import pytest

from tests.helpers import REPO, run_cli, run_workers, small_run

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "default.yaml")


def test_the_steps_asked_for_are_traced_on_every_rank(tmp_path):
    # 1536 samples / 256 = 6 steps per epoch: steps 3-4 inside the first epoch.
    result = run_cli("launch", "--cpu", CONFIG,
                     *small_run(tmp_path, "train.max_steps=6", "perf.profile_steps=3-4"))
    assert result.returncode == 0, result.stderr
    for rank in (0, 1):
        trace = json.loads((tmp_path / "profile" / f"rank_{rank}.trace.json").read_text())
        events = trace["traceEvents"]
        assert trace["distributedInfo"]["rank"] == rank
        steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep")}
        assert steps == {"ProfilerStep#3", "ProfilerStep#4"}  # step 2 was the warm-up
        assert any("Input Dims" in e.get("args", {}) for e in events)  # shapes
        assert any(e.get("name") == "[memory]" for e in events)  # allocations
        assert any(e.get("name", "").startswith("aten::convolution") for e in events)
    # The main rank alone prints the top operators, once.
    assert result.stdout.count("profile of steps 3-4 (rank 0") == 1
    table = result.stdout.split("profile of steps 3-4", 1)[1].splitlines()[1:12]
    assert "self cpu ms/step" in table[0]
    rows = [line for line in table[1:] if line.rstrip().endswith("%")]
    assert len(rows) == 10 and any(line.startswith("  aten::convolution") for line in rows)
    assert "aten::" in (tmp_path / "profile" / "top_ops.txt").read_text()


def test_no_profile_leaves_no_profile_folder(plain_runs):
    # tests/conftest.py: plain runs (no perf.profile_steps), 2 workers and 1.
    for run in plain_runs:
        assert (run / "summary.json").is_file()  # the run finished
        assert not (run / "profile").exists() and not (run / "hang").exists()


# The launcher's refusals (each message, exit 2) are checked in process in
# tests/unit/test_bad_input.py. Here the workers check it themselves, without the launcher
# (run_workers, as torchrun starts them); 7-9 needs the run's step count, so the check behind
# every message ran.
@pytest.mark.parametrize("steps, message", [
    ("7-9", "perf.profile_steps=7-9 is outside the run: it has 6 optimizer steps (1-6)"),
])
def test_bad_profile_steps_are_one_line_and_exit_2(tmp_path, steps, message):
    run = small_run(tmp_path / "run", "train.max_steps=6", f"perf.profile_steps={steps}")
    result = run_workers(2, CONFIG, *run)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert not (tmp_path / "run").exists()  # nothing written
