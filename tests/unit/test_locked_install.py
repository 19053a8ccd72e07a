"""requirements.lock and `make venv`'s locked install (tools/locked_install.py), in process: the
lock pins what requirements.txt pins, the two installs share no package, and a lock for another
machine installs nothing."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from tests.helpers import REPO
from tools import locked_install

LOCK = (REPO / "requirements.lock").read_text()


def requirement_pins(path: Path) -> dict[str, str]:
    return {name.lower(): version for name, version
            in re.findall(r"^([\w.-]+)==(\S+)", path.read_text(), re.M)}


def test_the_lock_pins_every_requirement_at_its_version():
    """A pin changed in requirements.txt without `make lock` fails here, not in a venv."""
    locked = dict(line.lower().split("==") for line in locked_install.pins(LOCK))
    wanted = requirement_pins(REPO / "requirements.txt")
    assert {name: locked.get(name) for name in wanted} == wanted
    assert locked_install.lock_machine(LOCK) is not None  # its first line names the machine


def test_the_two_installs_share_nothing_and_leave_nothing_out():
    lines = locked_install.pins(LOCK)
    stack, rest = locked_install.split(lines)
    assert sorted(stack + rest) == sorted(lines) and not set(stack) & set(rest)
    names = {line.split("==")[0].lower() for line in stack}
    assert "torch" in names and "torchvision" not in names
    assert {n for n in names if n != "torch"} <= {
        n for n in names if n.startswith(("nvidia-", "cuda-", "triton"))}
    assert any(line.lower().startswith("numpy==") for line in rest)


def test_a_lock_for_another_machine_installs_nothing(tmp_path, capsys):
    other = LOCK.replace(f"# for: {locked_install.lock_machine(LOCK)}",
                         "# for: CPython 3.9 on Plan9 mips", 1)
    # No pip in this "venv": had it tried to install, pip would not have been found.
    assert locked_install.install(tmp_path / "no-venv", other) == 0
    assert capsys.readouterr().out == (
        "make venv: requirements.lock is for CPython 3.9 on Plan9 mips, this is "
        f"{locked_install.machine()}: resolving requirements.txt instead\n")


def test_written_lock_names_this_machine_and_what_the_venv_holds(tmp_path):
    """`make lock`'s last step on the running venv (its pip freeze; no install)."""
    lock = tmp_path / "requirements.lock"
    assert locked_install.write(Path(sys.prefix), lock) == 0
    text = lock.read_text()
    assert locked_install.lock_machine(text) == locked_install.machine()
    assert f"torch=={metadata.version('torch')}" in locked_install.pins(text)
    assert not any(line.lower().startswith("pip==") for line in locked_install.pins(text))
