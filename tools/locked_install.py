"""`make venv`'s first step: requirements.lock into a fresh venv, in two pip processes side by side.

requirements.lock holds every package `pip install -r requirements.txt` puts into a fresh venv
on one kind of machine (its first line names it: CPython 3.11 on Linux x86_64), each at its
version. On such a machine this installs them without resolving anything (`--no-deps`), torch
with its CUDA libraries in one pip process and everything else in another: the two cores of
a small machine unpack and byte-compile at once (2026-12-06, 2-core VM, side by side: a fresh
`make venv` in 42 s against 82 s for one `pip install -r requirements.txt`). Anywhere else it
installs nothing and says so. Either way `make venv` then runs `pip install -r
requirements.txt`, which installs whatever is still missing or pinned differently (a stale
lock), and takes 2 s when nothing is.

Standard library only: it runs with the Python that makes the venv, before the venv exists.

    python3.11 -m tools.locked_install VENV          # install requirements.lock into VENV
    python3.11 -m tools.locked_install --write VENV  # requirements.lock from VENV (`make lock`)
"""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"
# torch and the wheels only it needs: about half of the venv's install time (38 s of 81 s).
TORCH_STACK = re.compile(r"^(torch|triton|nvidia-[\w-]+|cuda-[\w-]+)==", re.IGNORECASE)


def machine() -> str:
    """The kind of machine a lock is for, as its first line names it."""
    return (f"{platform.python_implementation()} {sys.version_info[0]}.{sys.version_info[1]} "
            f"on {platform.system()} {platform.machine()}")


def header(kind: str) -> str:
    return (f"# for: {kind}\n"
            "# Every package `pip install -r requirements.txt` put into a fresh venv there, "
            "written by `make lock`;\n"
            "# `make venv` installs these on such a machine (tools/locked_install.py). "
            "Edit requirements.txt, not this.\n")


def pins(text: str) -> list[str]:
    """The `name==version` lines of a lock."""
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def lock_machine(text: str) -> str | None:
    first = text.splitlines()[0] if text else ""
    return first.removeprefix("# for: ") if first.startswith("# for: ") else None


def split(lines: list[str]) -> tuple[list[str], list[str]]:
    """The torch stack and the rest: two installs that share no package."""
    stack = [line for line in lines if TORCH_STACK.match(line)]
    return stack, [line for line in lines if not TORCH_STACK.match(line)]


def install(venv: Path, text: str) -> int:
    kind = lock_machine(text)
    if kind != machine():
        print(f"make venv: requirements.lock is for {kind}, this is {machine()}: "
              "resolving requirements.txt instead", flush=True)
        return 0
    pip = [str(venv / "bin" / "pip"), "install", "--quiet", "--quiet", "--no-deps", "-r"]
    with tempfile.TemporaryDirectory() as tmp:
        running = []
        for i, group in enumerate(split(pins(text))):
            listed = Path(tmp) / f"group{i}.txt"
            listed.write_text("\n".join(group) + "\n")
            running.append(subprocess.Popen([*pip, str(listed)]))
        codes = [p.wait() for p in running]
    if any(codes):
        print(f"make venv: installing requirements.lock failed (pip exit codes {codes})",
              file=sys.stderr)
        return 1
    return 0


def write(venv: Path, lock: Path = LOCK) -> int:
    frozen = subprocess.run([str(venv / "bin" / "pip"), "freeze", "--all", "--exclude", "pip"],
                            check=True, capture_output=True, text=True).stdout
    packages = sorted(pins(frozen), key=str.lower)
    lock.write_text(header(machine()) + "\n".join(packages) + "\n")
    print(f"wrote {lock.name}: {len(packages)} packages for {machine()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.locked_install",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("venv", type=Path)
    parser.add_argument("--write", action="store_true", help="write requirements.lock from VENV")
    args = parser.parse_args(argv)
    return write(args.venv) if args.write else install(args.venv, LOCK.read_text())


if __name__ == "__main__":
    sys.exit(main())
