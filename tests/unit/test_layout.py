"""The package layout's rules, read from the source: the launcher and the config import what a
run is (train.run) and the config, never the worker's loop; train.run imports no loop either."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOOP = ("train.loop", "train.worker", "train.trainer", "train.__main__")


def own_imports(path: Path) -> set[str]:
    """Every module named by an import statement in `path`, at any depth (lazy ones too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def offenders(folder: str, banned: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for name in own_imports(path):
            if any(name == b or name.startswith(b + ".") for b in banned):
                found.append(f"{path.relative_to(REPO)} imports {name}")
    return found


@pytest.mark.parametrize("folder", ["launch", "common", "train/run"])
def test_the_launcher_config_and_run_package_import_no_training_loop(folder):
    assert offenders(folder, LOOP) == []


def test_the_check_sees_a_lazy_import_of_the_loop(tmp_path):
    # The rule above must be able to fail: an import inside a function counts as well.
    (tmp_path / "x.py").write_text("def f():\n    from train.loop.trainer import Trainer\n")
    assert "train.loop.trainer" in own_imports(tmp_path / "x.py")

