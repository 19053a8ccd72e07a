"""After a failed job: one short block naming the ranks that did not reach the collective the
others waited in, and where each was, from the records the ranks wrote themselves
(train/run/hang.py) into `run.dir/hang/`.

A rank killed by a fatal signal (SIGABRT from NCCL's watchdog, a segfault) left faulthandler's
dump in the temp folder under its pid: this node's launcher moves the dumps of its own failed
workers beside the records (`rank_<r>.fatal.txt`) and reads where their main thread was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from common.records import HANG_DIR, NCCL_TRACE_PREFIX
from train.run.hang import fatal_dump_path

# Records older than the launch are a previous job's; allow for clocks of other nodes that
# run behind (the doctor's "clocks" row checks them).
CLOCK_SLACK_S = 60.0
FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<name>\S+)')


def collect_fatal_dumps(failures: dict[int, Any], run_dir: Path) -> None:
    """Move faulthandler's dumps of this node's failed workers (`failures`: global rank ->
    torchrun's ProcessFailure) into run_dir/hang/; drop the empty ones."""
    for rank, failure in failures.items():
        dump = fatal_dump_path(failure.pid, os.getpid())
        if not dump.is_file():
            continue
        if dump.stat().st_size == 0:
            dump.unlink(missing_ok=True)
            continue
        (run_dir / HANG_DIR).mkdir(parents=True, exist_ok=True)
        shutil.move(dump, run_dir / HANG_DIR / f"rank_{rank}.fatal.txt")


def hang_block(run_dir: Path, since: float, backend: str = "gloo") -> str | None:
    """The block, or None when no rank of this job left a record (`since`: the launch time;
    `backend`: the job's, as the launcher planned it)."""
    folder = run_dir / HANG_DIR
    records = read_records(folder, since)
    if not records:
        return None
    latest = max(r.get("attempt", 0) for r in records.values())
    records = {rank: r for rank, r in records.items() if r.get("attempt", 0) == latest}
    world = max(r.get("world_size", 0) for r in records.values())
    steps = sorted({r["step"] for r in records.values() if r.get("step") is not None})
    at = f"at step {', '.join(map(str, steps))}" if steps else "in an unknown step"
    head, order = (_nccl_head if backend == "nccl" else _gloo_head)(records, at)
    lines = [f"hang: {head} (every rank's stack: {folder}/rank_<r>.txt)"]
    lines += ["  " + _line(rank, records[rank], backend) for rank in order]
    lines += [f"  rank {rank}: no record (it exited before it could write one, or its node "
              f"does not see {run_dir})" for rank in range(world) if rank not in records]
    if backend == "nccl":
        lines.append("  " + trace_note(run_dir))
    return "\n".join(lines)


def _gloo_head(records: dict[int, dict[str, Any]], at: str) -> tuple[str, list[int]]:
    """gloo blocks inside the collective's Python call: a rank's stack tells whether it waited
    in one. A rank killed by a signal tells nothing of the kind (its dump is all there is)."""
    missed = sorted(rank for rank, r in records.items() if r.get("waiting") is False)
    waited = sorted(rank for rank, r in records.items() if r.get("waiting"))
    killed = sorted(rank for rank, r in records.items() if r.get("waiting") is None)
    if missed and waited:
        head = (f"rank(s) {_ranks(missed)} did not reach the collective that rank(s) "
                f"{_ranks(waited)} waited in, {at}")
    elif waited:
        head = (f"every rank that reported waited in a collective, {at}: compare where (they "
                f"may wait in different collectives)")
    elif missed:
        head = f"rank(s) {_ranks(missed)} did not finish their step, {at}"
    else:
        head = f"rank(s) {_ranks(killed)} were killed by a signal, {at}"
    return head, missed + waited + killed


def _nccl_head(records: dict[int, dict[str, Any]], at: str) -> tuple[str, list[int]]:
    """NCCL queues a collective and returns: a rank blocks later, where it reads a result
    (`.item()`) or synchronizes, so its stack says where it stopped, not which collective it
    reached. The flight recorder's traces say that."""
    return (f"on NCCL, {at}: where each rank was blocked (NCCL runs collectives "
            f"asynchronously: which one each rank reached is in the flight-recorder traces "
            f"named below)", sorted(records))


def trace_note(run_dir: Path) -> str:
    """Where the NCCL flight recorder's traces are (the launcher sets the variable unless the
    user did: launch/plan.py), which ranks wrote one, and the command that reads them."""
    traces = os.environ.get("TORCH_NCCL_DEBUG_INFO_TEMP_FILE",
                            str(run_dir.absolute() / NCCL_TRACE_PREFIX))
    folder, prefix = os.path.split(traces)
    written = sorted(int(m[1]) for p in Path(folder or ".").glob(f"{prefix}*")
                     if (m := re.fullmatch(re.escape(prefix) + r"(\d+)", p.name)))
    if not written:
        return (f"flight-recorder traces: none in {traces}<rank> (NCCL's watchdog writes them "
                f"when a collective times out, with TORCH_NCCL_TRACE_BUFFER_SIZE > 0)")
    return (f"flight-recorder traces of rank(s) {_ranks(written)} in {traces}<rank>: `python "
            f"-m torch.distributed.flight_recorder.fr_trace {folder} -p {prefix}` names the "
            f"collective where the ranks parted and the ranks that never joined it")


def read_records(folder: Path, since: float) -> dict[int, dict[str, Any]]:
    """rank -> record, of this job: the JSON records and the fatal dumps written since the
    launch (a fatal dump becomes a record that tells where the rank was, not whether it
    reached a collective)."""
    records: dict[int, dict[str, Any]] = {}
    if not folder.is_dir():
        return records
    for path in folder.glob("rank_*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("time", 0) >= since - CLOCK_SLACK_S:
            records[int(record["rank"])] = record
    for path in folder.glob("rank_*.fatal.txt"):
        rank = int(path.name.split("_")[1].split(".")[0])
        if rank not in records and path.stat().st_mtime >= since - CLOCK_SLACK_S:
            records[rank] = fatal_record(rank, path)
    return records


def fatal_record(rank: int, path: Path) -> dict[str, Any]:
    """A record from faulthandler's dump: the main thread's innermost frame of our code."""
    text = path.read_text(errors="replace")
    first = text.strip().splitlines()[0] if text.strip() else "a fatal signal"
    stacks = re.split(r"\n(?=Thread 0x|Current thread 0x)", text)
    entry = f"{os.sep}train{os.sep}__main__.py"
    main = next((b for b in stacks if entry in b), text)
    frames = [m for m in map(FRAME.match, main.splitlines()) if m]  # most recent first
    # Our code: the checkout whose train/__main__.py the rank ran, not its venv; not the
    # standard library either (a rank between steps is often in logging, threading, json).
    root = next((m["file"][:-len(entry) + 1] for m in frames if m["file"].endswith(entry)),
                None)
    ours = next((m for m in frames if f"{os.sep}site-packages{os.sep}" not in m["file"]
                 and (root is None or m["file"].startswith(root))), None)
    return {"rank": rank, "waiting": None, "step": None, "where": "?", "at": _frame(ours),
            "innermost": _frame(frames[0] if frames else None),
            "reason": first.rstrip(":").lower(), "stack": path.name, "attempt": 0,
            "fatal": True}


def _frame(match: re.Match | None) -> str:
    return f"{_short(match['file'])}:{match['line']} in {match['name']}" if match else "?"


def _line(rank: int, record: dict[str, Any], backend: str) -> str:
    host = f" (pid {record['pid']} on {record['host']})" if "pid" in record else ""
    step = f"step {record['step']}, in {record['where']}, " if record.get("step") else ""
    where = f"at {record['at']}"
    if record.get("fatal"):
        what = "killed by a signal"
    elif backend == "nccl" or record.get("waiting") is None:
        what = "blocked"
    else:
        what = "waited in it" if record["waiting"] else "did not reach it"
    inner = record.get("innermost", "?")
    if backend == "nccl" and inner not in ("?", record["at"]):
        where += f" (innermost: {inner})"
    return f"rank {rank}{host}: {what}: {step}{where}; {record['reason'][:120]} [{record['stack']}]"


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))


def _short(path: str) -> str:
    if f"{os.sep}site-packages{os.sep}" in path:  # torch/..., as a traceback reader knows it
        return path.split(f"{os.sep}site-packages{os.sep}")[-1]
    marker = next((m for m in ("/train/", "/models/", "/common/", "/launch/", "/tests/")
                   if m in path), None)
    return path[path.index(marker) + 1:] if marker else path
