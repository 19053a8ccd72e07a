"""Stop signals and dying launchers, planted with real processes: SIGHUP mid-epoch, SIGINT and
SIGTERM during start-up, kill -9 of the launcher while its workers start, a stalled rank."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from common.signals import held_for_children
from tests.helpers import PYTHON, REPO
from tests.jobs import CONFIG, RUN, gone_within, running
from train.run.checkpoint import Checkpoints

pytestmark = [pytest.mark.slow, pytest.mark.serial]
STARTUP_LINE = "interrupted by {} during start-up: nothing was trained yet"


@pytest.mark.parametrize("how", ["SIGINT to the process group as soon as the workers exist",
                                 "SIGTERM to the launcher during its own checks",
                                 "SIGINT to `python -m train` during its start-up"])
def test_a_stop_during_start_up_is_one_line_and_exit_130(tmp_path, how):
    run_dir = tmp_path / "run"
    module = "train" if "python -m train" in how else "launch"
    args = [CONFIG, *RUN, f"run.dir={run_dir}"]
    with running(*(["--cpu"] if module == "launch" else []), *args, module=module,
                 new_session=True) as job:
        sig = signal.SIGTERM if "SIGTERM" in how else signal.SIGINT
        if "workers exist" in how:
            processes = job.workers(count=2)
            os.killpg(job.proc.pid, sig)  # what a terminal does on Ctrl-C
        else:  # its first lines ran (Python catches SIGINT itself from the start; not SIGHUP)
            job.catches(signal.SIGHUP)
            assert not job.workers(count=0)
            processes = []
            job.proc.send_signal(sig)
        assert job.finish(timeout=60) == 130
        prefix = "launch: " if module == "launch" else ""
        assert job.err() == [prefix + STARTUP_LINE.format(sig.name)]  # no traceback
        assert gone_within(processes, 10)
    assert not run_dir.exists()


def test_a_ctrl_c_as_workers_start_waits_for_their_handlers():
    """Ctrl-C reaches a child still starting its interpreter. Started inside held_for_children
    (as torchrun's workers are), it takes the quiet exit of a stop during start-up instead of
    dying of the signal or of a KeyboardInterrupt traceback; this process still gets its own."""
    first_line = ("from common.signals import stop_signals; "
                  "stop_signals(lambda signum: print('start-up', signum, flush=True)); "
                  "import time; time.sleep(60)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    class Taken(Exception):
        pass

    def take(signum: int, frame: object) -> None:
        raise Taken(signum)  # as torchrun's handler raises its SignalException

    before = signal.signal(signal.SIGINT, take)
    try:
        with held_for_children():
            children = [subprocess.Popen([PYTHON, "-c", first_line], env=env, text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                        for _ in range(3)]
            for child in children:  # just after exec: the interpreter is starting
                child.send_signal(signal.SIGINT)
            started = time.monotonic()
            with pytest.raises(Taken):  # at once, out of the sleep that torchrun's loop is in
                threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
                time.sleep(30)
            assert time.monotonic() - started < 5
    finally:
        signal.signal(signal.SIGINT, before)
    for child in children:
        out, err = child.communicate(timeout=60)
        assert (child.returncode, out, err) == (130, f"start-up {signal.SIGINT.value}\n", "")


def test_sighup_mid_epoch_stops_at_a_step_boundary_and_the_launcher_names_the_step(tmp_path):
    """An ssh session that drops sends SIGHUP: handled like SIGTERM, a checkpoint written."""
    with running("--cpu", CONFIG, *RUN, f"run.dir={tmp_path}") as job:
        job.wait_for("step 3/12")
        processes = job.workers(count=2)
        job.proc.send_signal(signal.SIGHUP)
        assert job.finish(timeout=60) == 130, job.output()
        assert gone_within(processes, 10)
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert saved["step"] % 5 == 0 and saved["batch_in_epoch"] == saved["step"] % 12
    assert job.err() == [f"launch: interrupted by SIGHUP; the workers stopped at step "
                         f"{saved['step']} and wrote a checkpoint there: run the same command "
                         f"to resume"], "\n".join(job.err())  # whole, should a line be extra
    # The workers left with os._exit (no atexit): their empty stack-dump files went too.
    assert not list(Path(tempfile.gettempdir()).glob(f"dptrain-fatal-{job.proc.pid}-*"))


def test_a_stop_that_cannot_reach_a_step_boundary_claims_no_checkpoint(tmp_path):
    """SIGTERM while rank 1 is stalled (the collective timeout far away): the ranks stop on
    their own once nothing moves, and the launcher names the last checkpoint there is."""
    with running("--cpu", CONFIG, *RUN, f"run.dir={tmp_path}", "checkpoint.every_steps=2",
                 "debug.stall_rank=1", "debug.stall_step=3", "debug.stall_seconds=300") as job:
        job.wait_for("debug: stalling", stream="err")
        processes = job.workers(count=2)
        sent = time.monotonic()
        job.proc.send_signal(signal.SIGTERM)
        assert job.finish(timeout=60) == 130, job.output()
        assert time.monotonic() - sent < 25  # the stall limit (10 s), not the 600 s timeout
        assert gone_within(processes, 5)
    assert Checkpoints(tmp_path / "checkpoints", keep=2).newest_complete() == 2
    assert job.err()[-1] == ("launch: interrupted by SIGTERM; no checkpoint was written for "
                             "this stop (a worker did not reach a step boundary, or the write did "
                             "not finish, in time): the "
                             "last one is step 2; run the same command to resume from it")


@pytest.mark.parametrize("delay", [0.0, 1.5])
def test_a_launcher_killed_while_its_workers_start_leaves_none_behind(tmp_path, delay):
    """kill -9 leaves no launcher to pass anything on: the workers, still importing torch or
    meeting at the rendezvous, must notice their parent is gone and leave within seconds."""
    with running("--cpu", CONFIG, *RUN, f"run.dir={tmp_path}",
                 "dist.rendezvous_timeout_s=600") as job:
        processes = job.workers(count=2)
        time.sleep(delay)
        job.proc.kill()
        killed = time.monotonic()
        assert gone_within(processes, 10), "orphaned workers"
        assert time.monotonic() - killed < 10
    assert not list(tmp_path.glob("checkpoints/step_*"))


def test_every_rank_leaves_within_the_timeout_and_10_s_of_a_stall(tmp_path):
    """The healthy rank fails after dist.timeout_s; the stalled one must not outlive it by a
    grace of its own (it was 2 x the timeout)."""
    timeout_s = 12
    with running("--cpu", CONFIG, *RUN, f"run.dir={tmp_path}", f"dist.timeout_s={timeout_s}",
                 "debug.stall_rank=1", "debug.stall_step=3", "debug.stall_seconds=300") as job:
        stalled = job.wait_for("debug: stalling", stream="err")
        processes = job.workers(count=2)
        assert gone_within(processes, timeout_s + 10 - (time.monotonic() - stalled))
        assert job.finish(timeout=30) == 3
    errors = [line for line in job.err() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(
        r"a collective failed at step 3, .*dist.timeout_s=12 s", errors[0]), job.err()
