"""The package layout's rules, read from the source: the launcher and the config import what a
run is (train.run) and the config, never the worker's loop, not even through another module;
train.run imports no loop either."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest

from common.schema import Config
from train.strategies import STRATEGIES

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "launch", "train", "models", "tools")
LOOP = ("train.loop", "train.worker", "train.__main__")
# launch/ray.py hosts workers: its train function runs inside Ray's worker processes.
HOSTS_WORKERS = {"launch.ray"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def named_imports(path: Path) -> set[str]:
    """Every module named by an import statement in `path`, at any depth (lazy ones too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Own module -> the own modules it imports (a package's import runs its __init__ too)."""
    files = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = {n for n in named_imports(path) if n in files}
        targets |= {".".join(t.split(".")[:i]) for t in targets
                    for i in range(1, t.count(".") + 1)} & files.keys()
        graph[name] = targets
    return graph


def reaches(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module `start` loads, directly or not, with the module that imports it."""
    via, todo = {start: ""}, [start]
    while todo:
        here = todo.pop()
        for there in graph.get(here, ()):
            if there not in via:
                via[there] = here
                todo.append(there)
    return via


def chain(via: dict[str, str], end: str) -> str:
    steps = [end]
    while via[steps[-1]]:
        steps.append(via[steps[-1]])
    return " <- ".join(steps)


@pytest.mark.parametrize("prefix", ["launch", "common", "train.run"])
def test_the_launcher_config_and_run_package_load_no_training_loop(prefix):
    graph = import_graph()
    found = []
    for start in sorted(m for m in graph if m.split(".")[:prefix.count(".") + 1]
                        == prefix.split(".") and m not in HOSTS_WORKERS):
        via = reaches(graph, start)
        found += [chain(via, m) for m in via if m.startswith(LOOP)]
    assert found == []


def test_the_check_follows_lazy_and_indirect_imports(tmp_path):
    # The rule above must be able to fail: an import inside a function counts, and so does a
    # module reached through another one.
    (tmp_path / "x.py").write_text("def f():\n    from train.loop.trainer import Trainer\n")
    assert "train.loop.trainer" in named_imports(tmp_path / "x.py")
    graph = {"launch.a": {"train.b"}, "train.b": {"train.loop.c"}}
    assert chain(reaches(graph, "launch.a"), "train.loop.c") == (
        "train.loop.c <- train.b <- launch.a")


def test_every_mode_of_the_schema_has_a_strategy():
    # The registry picks a strategy by `mode`: a mode the schema accepts without an entry
    # would fail with a KeyError at the first run of it.
    modes = typing.get_args(typing.get_type_hints(Config)["mode"])
    assert sorted(STRATEGIES) == sorted(modes)
