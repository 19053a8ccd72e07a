"""`make test`'s two passes (tests/suite.py): what each pytest command line selects."""

from tests.suite import passes


def test_the_parallel_pass_leaves_the_serial_tests_to_the_second():
    first, second = passes(["tests/test_cli.py", "-k", "overwrite"], jobs=2)
    assert first == ["-n", "2", "--dist", "loadfile", "-m", "not serial", "tests/test_cli.py",
                     "-k", "overwrite"]
    # the serial tests two at a time, a file each (test_slurm_real.py's one slurmctld stays one)
    assert second == ["-n", "2", "--dist", "loadfile", "-m", "serial", "tests/test_cli.py",
                      "-k", "overwrite"]
    assert passes([], jobs=4)[1][:2] == ["-n", "2"]


def test_a_users_marker_narrows_both_passes_and_one_job_runs_without_xdist():
    first, second = passes(["-m", "gpu or compat", "-x"], jobs=1)
    assert first == ["-m", "(gpu or compat) and not serial", "-x"]
    assert second == ["-m", "(gpu or compat) and serial", "-x"]
