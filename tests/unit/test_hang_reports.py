"""The launcher's hang block (launch/hangs.py) and a rank's "waiting" verdict (train/run/hang.py)
for both backends, from synthetic records and faulthandler dumps (pure logic, in process).

gloo blocks inside the collective's Python call, so a stack tells who waited; NCCL queues the
collective and blocks later (`.item()`, a synchronize), and a rank NCCL's watchdog aborted
leaves only a faulthandler dump: neither may be called "did not reach the collective"."""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

import pytest

from launch.hangs import hang_block
from train.run.hang import waits_in_collective

TORCH = "/venv/lib/python3.12/site-packages/torch"
REPO = "/work/dptrain"


def dump(*frames: str) -> str:
    """faulthandler's text for a SIGABRT: a side thread, then the main thread's stack."""
    return ("Fatal Python error: Aborted\n\n"
            "Thread 0x00007f00000001 (most recent call first):\n"
            '  File "/usr/lib/python3.12/threading.py", line 331 in wait\n\n'
            "Current thread 0x00007f00000002 (most recent call first):\n"
            + "".join(f"  {frame}\n" for frame in frames)
            + f'  File "{REPO}/train/__main__.py", line 12 in <module>\n')


def record(rank: int, waiting: bool | None, at: str, innermost: str, reason: str,
           backend: str) -> dict:
    return {"rank": rank, "world_size": 3, "step": 7, "where": "compute", "waiting": waiting,
            "reason": reason, "at": at, "innermost": innermost, "stack": f"rank_{rank}.txt",
            "pid": 100 + rank, "host": "node0", "time": time.time(), "attempt": 0,
            "backend": backend}


def write(run_dir: Path, records: list[dict], fatal: dict[int, str]) -> Path:
    folder = run_dir / "hang"
    folder.mkdir(parents=True)
    for r in records:
        (folder / f"rank_{r['rank']}.json").write_text(json.dumps(r))
    for rank, text in fatal.items():
        (folder / f"rank_{rank}.fatal.txt").write_text(text)
    return run_dir


@pytest.fixture(autouse=True)
def default_traces(monkeypatch):
    monkeypatch.delenv("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", raising=False)


def test_gloo_names_the_rank_that_did_not_reach_the_collective(tmp_path):
    since = time.time()
    write(tmp_path, [
        record(0, True, "train/optim.py:140 in step", f"{TORCH}/distributed/c10d.py:9 in wait",
               "its collective failed: Timed out waiting 5000ms", "gloo"),
        record(1, False, "train/loop/faults.py:30 in inside_step", "train/loop/faults.py:30 in "
               "inside_step", "no progress for 2.5 s, and SIGTERM asked it to stop", "gloo"),
        record(2, True, "train/optim.py:140 in step", "x", "its collective failed: x", "gloo"),
    ], {})
    block = hang_block(tmp_path, since, "gloo").splitlines()
    assert block[0].startswith("hang: rank(s) 1 did not reach the collective that rank(s) 0, "
                               "2 waited in, at step 7")
    assert "did not reach it" in block[1] and block[1].startswith("  rank 1 (pid 101")
    assert "waited in it" in block[2] and "waited in it" in block[3]
    assert not any("flight-recorder" in line for line in block)


def test_gloo_does_not_say_a_rank_killed_by_a_signal_did_not_reach_the_collective(tmp_path):
    since = time.time()
    write(tmp_path, [
        record(0, True, "train/optim.py:140 in step", "x", "its collective failed: x", "gloo"),
        record(2, True, "train/optim.py:140 in step", "x", "its collective failed: x", "gloo"),
    ], {1: dump(f'File "{REPO}/train/loop/trainer.py", line 175 in train_step')})
    block = hang_block(tmp_path, since, "gloo")
    assert "did not reach" not in block
    assert block.startswith("hang: every rank that reported waited in a collective, at step 7")
    line = next(li for li in block.splitlines() if li.startswith("  rank 1"))
    assert line == ("  rank 1: killed by a signal: at train/loop/trainer.py:175 in train_step; "
                    "fatal python error: aborted [rank_1.fatal.txt]")


def test_a_rank_killed_in_the_standard_library_is_placed_in_our_code_that_called_it(tmp_path):
    """Between steps a rank is often in logging, threading or contextlib: the line names the
    innermost frame of the checkout the rank ran, not the standard library (CI once aborted a
    rank in common/signals.py; a rank in stdlib code would have been named by that file)."""
    since = time.time()
    write(tmp_path, [], {1: dump('File "/usr/lib/python3.12/logging/__init__.py", line 1 in emit',
                                 f'File "{TORCH}/nn/modules/module.py", line 9 in _call_impl',
                                 'File "/usr/lib/python3.12/contextlib.py", line 144 in __exit__',
                                 f'File "{REPO}/common/signals.py", line 178 in alive')})
    line = next(li for li in hang_block(tmp_path, since, "gloo").splitlines()
                if li.startswith("  rank 1"))
    assert line == ("  rank 1: killed by a signal: at common/signals.py:178 in alive; "
                    "fatal python error: aborted [rank_1.fatal.txt]")


def test_nccl_says_where_each_rank_blocked_and_points_at_the_flight_recorder(tmp_path):
    since = time.time()
    write(tmp_path, [
        # A rank in a stall (the cause) and one blocked reading the loss back: on NCCL the
        # worker cannot tell whether either reached the collective (waiting: None).
        record(1, None, "train/loop/faults.py:30 in inside_step",
               "train/loop/faults.py:30 in inside_step",
               "no progress for 300 s, and SIGTERM asked it to stop", "nccl"),
        record(2, None, "train/loop/metrics.py:51 in read", "train/loop/metrics.py:51 in read",
               "no progress for 300 s, and SIGTERM asked it to stop", "nccl"),
    ], {0: dump(f'File "{TORCH}/cuda/__init__.py", line 1083 in synchronize',
                f'File "{REPO}/train/observe/timer.py", line 61 in phase')})
    for rank in (0, 2):  # the watchdog's dumps of the ranks whose collective timed out
        (tmp_path / f"nccl_trace_rank_{rank}").write_bytes(b"\x80")
    block = hang_block(tmp_path, since, "nccl")
    assert "did not reach" not in block and "waited in it" not in block
    lines = block.splitlines()
    assert lines[0].startswith("hang: on NCCL, at step 7: where each rank was blocked")
    assert lines[1] == ("  rank 0: killed by a signal: at train/observe/timer.py:61 in phase "
                        "(innermost: torch/cuda/__init__.py:1083 in synchronize); fatal python "
                        "error: aborted [rank_0.fatal.txt]")
    assert lines[2].startswith("  rank 1 (pid 101 on node0): blocked: step 7, in compute, at "
                               "train/loop/faults.py:30 in inside_step; no progress")
    assert lines[3].startswith("  rank 2 (pid 102 on node0): blocked: step 7, in compute, at "
                               "train/loop/metrics.py:51 in read;")
    assert lines[4] == (f"  flight-recorder traces of rank(s) 0, 2 in {tmp_path.absolute()}/"
                        f"nccl_trace_rank_<rank>: `python -m torch.distributed.flight_recorder."
                        f"fr_trace {tmp_path.absolute()} -p nccl_trace_rank_` names the "
                        f"collective where the ranks parted and the ranks that never joined it")


def test_nccl_without_traces_says_none_were_written_where_the_user_put_them(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", str(tmp_path / "fr" / "trace_"))
    since = time.time()
    write(tmp_path, [], {1: dump(f'File "{REPO}/train/loop/metrics.py", line 51 in read')})
    block = hang_block(tmp_path, since, "nccl").splitlines()
    assert "killed by a signal: at train/loop/metrics.py:51 in read;" in block[1]
    assert block[-1].startswith(f"  flight-recorder traces: none in {tmp_path}/fr/trace_<rank>")


def frames(*files: str) -> list[traceback.FrameSummary]:
    return [traceback.FrameSummary(f, 1, "f") for f in files]


def test_a_rank_waits_in_a_collective_on_gloo_only_by_its_stack():
    in_collective = frames(f"{REPO}/train/loop/trainer.py",
                           f"{TORCH}/distributed/distributed_c10d.py")
    in_item = frames(f"{REPO}/train/loop/trainer.py", f"{REPO}/train/loop/metrics.py")
    assert waits_in_collective(in_collective, "gloo") is True
    assert waits_in_collective(in_item, "gloo") is False
    assert waits_in_collective(in_collective, "nccl") is None  # NCCL blocks elsewhere
    assert waits_in_collective(in_item, "cuda:nccl,cpu:gloo") is None
