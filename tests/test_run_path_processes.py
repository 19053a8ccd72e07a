"""Where a run lives, seen from several processes: the default folder's fingerprint across
hash seeds, `runs/latest` pointed at by runs that start at once. (The rest, in one process:
tests/unit/test_run_path.py.)"""

from __future__ import annotations

import os
import subprocess

from tests.helpers import PYTHON, REPO
from tests.unit.test_run_path import DEFAULT_FINGERPRINT
from train.config import load_config
from train.run.location import LATEST, fingerprint

CONFIG = str(REPO / "configs" / "default.yaml")


def test_the_fingerprint_is_fixed_across_processes_and_hash_seeds():
    assert fingerprint(load_config(CONFIG)) == DEFAULT_FINGERPRINT
    code = ("from common.config import load_config; from train.run.location import fingerprint; "
            f"print(fingerprint(load_config({CONFIG!r})))")  # no torch: a quick start
    for seed in ("0", "12345"):
        out = subprocess.run([PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}, check=True).stdout
        assert out.strip() == DEFAULT_FINGERPRINT


def test_runs_started_at_once_leave_one_valid_link(tmp_path):
    names = [f"run{i}" for i in range(4)]
    for name in names:
        (tmp_path / "runs" / name).mkdir(parents=True)
    code = ("import sys; from pathlib import Path; from train.run.location import point_latest\n"
            "for _ in range(300): point_latest(Path('runs') / sys.argv[1])")
    procs = [subprocess.Popen([PYTHON, "-c", code, name], cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(REPO)}) for name in names]
    assert [p.wait(60) for p in procs] == [0, 0, 0, 0]
    assert os.readlink(tmp_path / "runs" / LATEST) in names
    assert (tmp_path / "runs" / LATEST).resolve().parent == (tmp_path / "runs").resolve()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([*names, LATEST])
