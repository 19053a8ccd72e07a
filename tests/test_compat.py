"""The supported torch range: torchrun flags asked of the installed torchrun's parser, and a
torch older than the minimum refused in one line by the launcher and the worker entry.

All of it also runs in the torch-2.11 tier (`make test-torch211`), the oldest supported torch.
"""

from __future__ import annotations

import argparse
import re
import subprocess

import pytest
import torch
import torch.distributed.run

from common import torch_support
from common.torch_support import (
    minimum_torch,
    refuse_unsupported_torch,
    torch_problem,
    version_tuple,
)
from launch.cli import parse_args
from launch.plan import SHUTDOWN_TIMEOUT_S, make_plan, torchrun_options
from tests.helpers import PYTHON, REPO, environment, pinned

pytestmark = pytest.mark.compat
CONFIG = str(REPO / "configs" / "default.yaml")
REAL_PARSER = torch.distributed.run.get_args_parser


def parser_without(flag: str) -> argparse.ArgumentParser:
    """The installed torchrun's parser less one option: torchrun as a release without it."""
    parser = REAL_PARSER()
    action = parser._option_string_actions.get(flag)
    if action is not None:  # torch 2.11's has none to remove
        parser._remove_action(action)
        for option in action.option_strings:
            del parser._option_string_actions[option]
    return parser


def plan_args(tmp_path, *launcher_flags: str) -> list[str]:
    # the batch splits over every world size of an elastic 2:4 nodes x 2 workers
    return make_plan(parse_args(["--cpu", "--gpus", "2", *launcher_flags, CONFIG,
                                 f"run.dir={tmp_path}", "wandb.mode=disabled",
                                 "train.batch_size=240"])).torchrun_args


@pytest.mark.parametrize("flags", [
    pytest.param([], id="one node"),
    pytest.param(["--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1",
                  "--master-port", "29400"], id="two nodes"),
    pytest.param(["--nnodes", "2:4", "--master-addr", "127.0.0.1"], id="elastic"),
    pytest.param(["--max-restarts", "3"], id="restarts"),
])
def test_the_installed_torchrun_takes_every_plan_the_launcher_makes(tmp_path, flags):
    args = plan_args(tmp_path, *flags)
    parsed = REAL_PARSER().parse_args(args)  # an unknown flag: SystemExit 2, as torchrun
    assert (parsed.module, parsed.training_script) == (True, "train")
    assert parsed.nnodes == args[args.index("--nnodes") + 1]


def test_the_plan_passes_shutdown_timeout_only_to_a_torchrun_that_takes_it(tmp_path,
                                                                           monkeypatch):
    args = plan_args(tmp_path / "here")
    REAL_PARSER().parse_args(args)  # the installed torchrun takes every flag of the plan
    if "--shutdown-timeout" in torchrun_options():  # torch 2.14: asked for, and given
        assert args[args.index("--shutdown-timeout") + 1] == str(SHUTDOWN_TIMEOUT_S)
    else:  # torch 2.11
        assert "--shutdown-timeout" not in args

    monkeypatch.setattr(torch.distributed.run, "get_args_parser",
                        lambda: parser_without("--shutdown-timeout"))
    older = plan_args(tmp_path / "older")
    assert "--shutdown-timeout" not in older
    assert older[older.index("-m") + 1] == "train" and "--monitor-interval" in older
    parser_without("--shutdown-timeout").parse_args(older)  # what crashed every launch on 2.11
    if "--shutdown-timeout" in args:
        with pytest.raises(SystemExit):
            parser_without("--shutdown-timeout").parse_args(args)


@pytest.mark.parametrize("installed, refused", [
    ("2.10.2+cu128", True), ("2.9.0", True), ("1.13.1", True),
    ("2.11.0+cu130", False), ("2.11.1", False), ("2.14.1", False), ("2.15.0.dev20270101", False),
])
def test_only_a_torch_older_than_the_minimum_is_a_problem(installed, refused):
    problem = torch_problem(installed)
    assert (problem is not None) == refused
    if refused:
        assert f"torch {installed} is installed" in problem
        assert f"needs torch>={minimum_torch()}" in problem and "\n" not in problem


def test_the_minimum_is_pyprojects_and_the_tier_runs_exactly_it():
    declared = re.search(r'"torch>=([0-9.]+),<([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    assert declared and minimum_torch() == declared.group(1)
    pins = {name: pinned("torch", name)
            for name in ("requirements.txt", "requirements-torch211.txt")}
    low, high = version_tuple(declared.group(1)), version_tuple(declared.group(2))
    assert version_tuple(pins["requirements-torch211.txt"])[:len(low)] == low  # the oldest
    assert low <= version_tuple(pins["requirements.txt"])[:len(high)] < high  # the lock is in
    assert torch_problem() is None  # this venv's own torch (2.14 or the tier's 2.11)


@pytest.mark.parametrize("requirement", ["torch>=2.9,<3", "torch<3,>=2.9"])
def test_the_minimum_comes_from_the_installed_metadata_without_a_checkout(monkeypatch, tmp_path,
                                                                          requirement):
    """`pip install .` writes the specifiers sorted ("torch<2.15,>=2.11"): both orders."""
    monkeypatch.setattr(torch_support, "PYPROJECT", tmp_path / "pyproject.toml")
    monkeypatch.setattr(torch_support.metadata, "requires",
                        lambda name: ["numpy>=2", "torchvision<1,>=0.24", requirement,
                                      'torchaudio>=2.1; extra == "audio"'])
    assert minimum_torch() == "2.9"


def test_refusing_is_one_line_from_local_rank_0_and_exit_2(monkeypatch, capsys):
    refuse_unsupported_torch()  # this torch is supported: nothing happens
    assert capsys.readouterr() == ("", "")
    monkeypatch.setattr(torch, "__version__", "2.10.0+cpu")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit) as leaving:
        refuse_unsupported_torch()
    assert leaving.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("error: torch 2.10.0+cpu is installed, dptrain needs torch>=")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch_support, "REPORT_GRACE_S", 0)
    with pytest.raises(SystemExit) as leaving:
        refuse_unsupported_torch()
    assert leaving.value.code == 2 and capsys.readouterr() == ("", "")


# The entry points as `python -m` runs them, in a real process whose torch says it is 2.10.0.
AS_OLDER_TORCH = ("import runpy, sys, torch; torch.__version__ = '2.10.0'; "
                  "sys.argv = ['x', *sys.argv[2:]]; "
                  "runpy.run_module(sys.argv_module, run_name='__main__', alter_sys=True)")


@pytest.mark.parametrize("module", ["launch", "train"])
def test_the_launcher_and_the_worker_entry_refuse_an_older_torch(tmp_path, module):
    code = AS_OLDER_TORCH.replace("sys.argv_module", repr(module))
    run_dir = tmp_path / "run"
    result = subprocess.run([PYTHON, "-c", code, module, CONFIG, f"run.dir={run_dir}"],
                            cwd=REPO, env=environment({"PYTHONPATH": str(REPO)}),
                            text=True, capture_output=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"error: torch 2.10.0 is installed, dptrain needs torch>={minimum_torch()} "
        f"(pyproject.toml): install a supported torch, e.g. `make venv` (requirements.txt)"]
    assert result.stdout == "" and not run_dir.exists()  # nothing planned, nothing written
