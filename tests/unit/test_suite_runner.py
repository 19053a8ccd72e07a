"""`make test`'s two passes (tests/suite.py): what each pytest command line selects."""

from tests.helpers import REPO
from tests.suite import passes


def test_the_parallel_pass_leaves_the_serial_tests_to_the_second():
    first, second = passes(["tests/test_cli.py", "-k", "overwrite"], jobs=2)
    # whole files, in collection order (tests/conftest.py puts the longest first)
    spread = ["-n", "2", "--dist", "loadfile", "--no-loadscope-reorder"]
    assert first == [*spread, "-m", "not serial", "tests/test_cli.py", "-k", "overwrite"]
    # the serial tests two at a time, a file each (test_slurm_real.py's one slurmctld stays one)
    assert second == [*spread, "-m", "serial", "tests/test_cli.py", "-k", "overwrite"]
    assert passes([], jobs=4)[1][:2] == ["-n", "2"]


def test_a_users_marker_narrows_both_passes_and_one_job_runs_without_xdist():
    first, second = passes(["-m", "gpu or compat", "-x"], jobs=1)
    assert first == ["-m", "(gpu or compat) and not serial", "-x"]
    assert "--no-loadscope-reorder" not in first
    assert second == ["-m", "(gpu or compat) and serial", "-x"]


def test_the_longest_files_are_handed_out_first_in_each_pass():
    """xdist gives whole files out in collection order: tests/conftest.py sorts them longest
    first, each pass by its own list, a file's tests in their order, the rest after."""
    from tests.conftest import LONGEST_FIRST, LONGEST_FIRST_SERIAL, _longest_first

    class Item:
        def __init__(self, nodeid: str, serial: bool = False):
            self.nodeid, self.serial = nodeid, serial

        def get_closest_marker(self, name):
            return object() if name == "serial" and self.serial else None

    items = [Item("tests/test_allreduce.py::a"), Item("tests/unit/test_cli.py::b"),
             Item(f"{LONGEST_FIRST[1]}::c"), Item(f"{LONGEST_FIRST[0]}::d"),
             Item(f"{LONGEST_FIRST[1]}::e"), Item(f"{LONGEST_FIRST_SERIAL[0]}::f", serial=True),
             Item(f"{LONGEST_FIRST_SERIAL[2]}::g", serial=True)]
    ordered = [item.nodeid.split("::")[1] for item in sorted(items, key=_longest_first)]
    # tests/unit/test_cli.py is not tests/test_cli.py: it stays among the rest
    assert ordered == ["d", "c", "e", "a", "b", "f", "g"]
    every = {path.relative_to(REPO).as_posix() for path in (REPO / "tests").glob("test_*.py")}
    assert set(LONGEST_FIRST) | set(LONGEST_FIRST_SERIAL) <= every  # no file renamed away
