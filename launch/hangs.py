"""After a failed job: one short block naming the ranks that did not reach the collective the
others waited in, and where each was, from the records the ranks wrote themselves
(train/hang.py) into `run.dir/hang/`.

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

from common.records import HANG_DIR
from train.hang import fatal_dump_path

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


def hang_block(run_dir: Path, since: float) -> str | None:
    """The block, or None when no rank of this job left a record (`since`: the launch time)."""
    folder = run_dir / HANG_DIR
    records = read_records(folder, since)
    if not records:
        return None
    latest = max(r.get("attempt", 0) for r in records.values())
    records = {rank: r for rank, r in records.items() if r.get("attempt", 0) == latest}
    world = max(r.get("world_size", 0) for r in records.values())
    missed = sorted(rank for rank, r in records.items() if not r.get("waiting"))
    waited = sorted(rank for rank, r in records.items() if r.get("waiting"))
    silent = [rank for rank in range(world) if rank not in records]
    steps = sorted({r["step"] for r in records.values() if r.get("step") is not None})
    at = f"at step {', '.join(map(str, steps))}" if steps else "in an unknown step"
    if missed and waited:
        head = (f"rank(s) {_ranks(missed)} did not reach the collective that rank(s) "
                f"{_ranks(waited)} waited in, {at}")
    elif waited:
        head = (f"every rank that reported waited in a collective, {at}: compare where (they "
                f"may wait in different collectives)")
    else:
        head = f"rank(s) {_ranks(missed)} did not finish their step, {at}"
    lines = [f"hang: {head} (every rank's stack: {folder}/rank_<r>.txt)"]
    for rank in missed + waited:
        lines.append("  " + _line(rank, records[rank]))
    for rank in silent:
        lines.append(f"  rank {rank}: no record (it exited before it could write one, or its "
                     f"node does not see {run_dir})")
    return "\n".join(lines)


def read_records(folder: Path, since: float) -> dict[int, dict[str, Any]]:
    """rank -> record, of this job: the JSON records and the fatal dumps written since the
    launch (a fatal dump becomes a record that did not reach the collective)."""
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
    main = next((b for b in stacks if f"train{os.sep}__main__.py" in b), text)
    frames = [m for m in map(FRAME.match, main.splitlines()) if m]  # most recent first
    ours = next((m for m in frames if "site-packages" not in m["file"]), None)
    at = f"{_short(ours['file'])}:{ours['line']} in {ours['name']}" if ours else "?"
    return {"rank": rank, "waiting": False, "step": None, "where": "?", "at": at,
            "reason": first.rstrip(":").lower(), "stack": path.name, "attempt": 0}


def _line(rank: int, record: dict[str, Any]) -> str:
    what = "waited in it" if record.get("waiting") else "did not reach it"
    host = f" (pid {record['pid']} on {record['host']})" if "pid" in record else ""
    step = f"step {record['step']}, in {record['where']}, " if record.get("step") else ""
    return (f"rank {rank}{host}: {what}: {step}at {record['at']}; {record['reason'][:120]} "
            f"[{record['stack']}]")


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))


def _short(path: str) -> str:
    marker = next((m for m in ("/train/", "/models/", "/common/", "/launch/", "/tests/")
                   if m in path), None)
    return path[path.index(marker) + 1:] if marker else path
