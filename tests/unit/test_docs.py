"""The documentation's checkable claims: the generated config reference is current, links and
section references resolve, named files, make targets and code locations exist, the code map
lists every module, README stays a short page. In process, no subprocesses."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.helpers import REPO
from tools import config_reference

DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", *DOCS]
PACKAGES = ("common", "launch", "train", "models", "tools")
# Backticked paths inside the repository start with one of these.
ROOTS = tuple(f"{d}/" for d in (*PACKAGES, "tests", "configs", "docs", ".ci"))


def _name(page: Path) -> str:
    return str(page.relative_to(REPO))


def _prose(page: Path) -> str:
    """The page without its fenced blocks (console output quotes paths of other machines)."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _headings(page: Path) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^#{1,6} (.+)$", _prose(page), re.M)]


def test_the_config_reference_is_generated_from_the_current_schema():
    page = config_reference.PAGE.read_text()
    assert config_reference.splice(page, config_reference.render()) == page, (
        "docs/configuration.md's config reference does not match common/schema*.py: run "
        "`make docs` (python -m tools.config_reference) and commit docs/configuration.md")


def test_every_config_key_has_a_comment_for_the_reference():
    bare = [k.name for k in config_reference.keys() if not k.comment]
    assert not bare, (f"config keys without a comment in common/schema*.py (the reference "
                      f"shows it): {', '.join(bare)}; add a one-line comment beside each")


def test_the_reference_marks_identity_as_train_identity_decides():
    from common.config import Config
    from train.run.identity import identity

    in_identity = set(identity(Config()))
    marked = {k.name for k in config_reference.keys() if k.identity}
    assert marked == in_identity


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_each_page_has_one_title_first(page):
    titles = [h for h in re.findall(r"^(#+) ", _prose(page), re.M) if h == "#"]
    assert page.read_text().startswith("# ") and len(titles) == 1, (
        f"{_name(page)}: one '# title' on the first line, sections as '## ...'")


def test_the_default_run_folder_named_in_the_docs_is_the_one_make_train_uses():
    from common.config import load_config
    from train.run.location import default_run_dir

    folder = default_run_dir(load_config(REPO / "configs" / "default.yaml")).name
    for page in PAGES:
        named = set(re.findall(r"runs/(default-[0-9a-f]+)", page.read_text()))
        assert named <= {folder}, (f"{_name(page)} names {sorted(named)}, but configs/"
                                   f"default.yaml with 2 workers runs in runs/{folder}")


def test_readme_is_a_short_page():
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines <= 300, f"README.md has {lines} lines; move detail into a docs/ page"


def test_every_docs_page_is_in_the_readme_index():
    readme = (REPO / "README.md").read_text()
    missing = [p.name for p in DOCS if f"(docs/{p.name})" not in readme]
    assert not missing, f"docs pages missing from README's Documentation index: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_links_resolve_inside_the_repository(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page)):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_relative_to(REPO) or not file.exists():
            broken.append(f"{target} (no such file in the repository)")
        elif anchor and anchor not in {_slug(h) for h in _headings(file)}:
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{_name(page)}: broken links: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_quoted_section_references_name_a_heading_of_the_page(page):
    headings = {h.replace("`", "") for h in _headings(page)}
    wrong = [s for s in re.findall(r'see "([^"]+)"', _prose(page)) if s not in headings]
    assert not wrong, f"{_name(page)} refers to sections it does not have: {wrong}"


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w-]*):", text, re.M))


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_named_make_targets_exist(page):
    text = page.read_text()  # `make x` in prose, and command lines starting with make
    named = set(re.findall(r"`make ([a-z][\w-]*)", text) +
                re.findall(r"^\s*make ([a-z][\w-]*)", text, re.M))
    unknown = named - _make_targets()
    assert not unknown, f"{_name(page)}: no such make target: {sorted(unknown)}"


def _repo_paths(text: str) -> set[str]:
    """Backticked paths of the repository: `train/dist.py`, `train/dist.py: setup`, `docs/`."""
    found = set()
    for code in re.findall(r"`([^`\n]+)`", text):
        for word in code.split():
            word = word.rstrip(":,;)").split(":")[0]
            if word.startswith(ROOTS) and not re.search(r"[<>*{}]|\.\.\.", word):
                found.add(word)
    return found


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_named_files_exist(page):
    missing = sorted(p for p in _repo_paths(_prose(page)) if not (REPO / p).exists())
    assert not missing, f"{_name(page)} names files that do not exist: {missing}"


def _function_lines(path: Path, name: str) -> list[range]:
    tree = ast.parse(path.read_text())
    return [range(n.lineno, (n.end_lineno or n.lineno) + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name]


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_quoted_code_locations_point_into_the_named_function(page):
    wrong = []
    for file, line, func in re.findall(r"([\w/]+\.py):(\d+)\s+in\s+(\w+)", page.read_text()):
        if not file.startswith(ROOTS):  # torch's own frames, quoted in console output
            continue
        path = REPO / file
        if not path.is_file() or not any(int(line) in r for r in _function_lines(path, func)):
            wrong.append(f"{file}:{line} in {func}")
    assert not wrong, f"{_name(page)}: these lines are not inside that function now: {wrong}"


def test_the_code_map_lists_every_module_and_nothing_else():
    page = (REPO / "docs" / "architecture.md").read_text()
    section = page.split("## Code map", 1)[1].split("\n## ", 1)[0]
    listed = {p for p in _repo_paths(section) if p.endswith(".py") and p.startswith(
        tuple(f"{pkg}/" for pkg in PACKAGES))}
    present = {str(p.relative_to(REPO)) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")
               if p.name != "__init__.py"}
    assert not present - listed, (f"modules missing from docs/architecture.md's code map: "
                                  f"{sorted(present - listed)}")
    assert not listed - present, (f"docs/architecture.md's code map lists files that are gone: "
                                  f"{sorted(listed - present)}")


def test_the_code_refers_to_docs_sections_that_exist():
    """A docs page (and #anchor) named in comments and docstrings exists, with that heading."""
    sources = [p for pkg in (*PACKAGES, "tests", "configs", "launch/slurm")
               for p in (REPO / pkg).rglob("*") if p.suffix in (".py", ".yaml", ".sbatch")]
    wrong = []
    for source in [*sources, REPO / "Makefile"]:
        for page, anchor in re.findall(r"\b(docs/[\w-]+\.md|README\.md)(?:#([\w-]+))?",
                                       source.read_text()):
            target = REPO / page
            if not target.is_file() or (anchor and anchor not in
                                        {_slug(h) for h in _headings(target)}):
                wrong.append(f"{source.relative_to(REPO)}: {page}#{anchor}")
    assert not wrong, f"references to docs sections that do not exist: {sorted(set(wrong))}"


def test_the_reference_names_every_dataset_and_optimizer_the_library_knows():
    from train.data import DATASETS
    from train.optim import OPTIMIZERS

    comments = {k.name: k.comment for k in config_reference.keys()}
    for key, known in (("data.name", set(DATASETS)), ("optim.name", set(OPTIMIZERS))):
        listed = {name.strip() for name in comments[key].split("|")}
        assert listed == known, (f"{key}'s comment in common/schema*.py lists {sorted(listed)}; "
                                 f"the library knows {sorted(known)}")


def test_readme_names_the_paths_make_compare_runs():
    from tools.compare import PATHS

    row = next(line for line in (REPO / "README.md").read_text().splitlines()
               if line.startswith("| `make compare`"))
    modes = {label.split()[0] for label in PATHS}
    named = {m for m in ("ddp", "dp", "scratch", "fsdp", "zero") if re.search(rf"\b{m}\b", row)}
    assert named == modes, f"README's make compare row names {sorted(named)}; it runs {PATHS}"
