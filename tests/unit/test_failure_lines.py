"""What a failure's one line claims must be what happened: a peer that exited is no wait that
ran out, the first of two stop signals is the cause, node 0 that went away is no rendezvous
that never answered; and nothing follows the line (no traceback of torchrun's own threads)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import weakref
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch

from common.signals import held_for_children
from launch.agent import rendezvous_failure, stop_keep_alive_threads
from train.dist import DistContext
from train.loop.trainer import explain_failure
from train.run.hang import NoHangRecord

CPU = DistContext(0, 0, 1, 1, torch.device("cpu"), "none", 1)
NO_STRATEGY = SimpleNamespace(explain=lambda exc, step: None)
# What gloo raises (torch 2.11 to 2.14) when the peer's process is gone, and when a wait ran out.
CLOSED = ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
          "[127.0.0.1]:41234. This is typically caused by a remote worker crashing. Check the "
          "logs of the remote worker before reporting an error")
TIMED_OUT = ("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
             "600000ms for recv operation to complete")


def test_a_peer_that_exited_is_not_reported_as_a_wait_that_ran_out():
    guards = SimpleNamespace(timeout_s=600, hang=NoHangRecord())
    gone = str(explain_failure(RuntimeError(CLOSED), NO_STRATEGY, 3, "forward/backward",
                               guards, CPU))
    assert gone == ("a collective failed at step 3, in forward/backward, another worker exited "
                    "(its connection closed) (Connection closed by peer [127.0.0.1]:41234)")
    waited = str(explain_failure(RuntimeError(TIMED_OUT), NO_STRATEGY, 3, "forward/backward",
                                 guards, CPU))
    assert "after waiting up to dist.timeout_s=600 s: another worker stalled or died" in waited


def test_the_first_of_two_stop_signals_is_recorded_first():
    taken: list[int] = []
    both = threading.Event()

    def handler(signum: int, frame: object) -> None:
        taken.append(signum)
        if len(taken) == 2:
            both.set()

    before = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    received: list[int] = []
    try:
        with held_for_children(received):
            # One at a time, as a scheduler's SIGTERM and a user's later Ctrl-C come: two
            # signals pending at once are delivered lowest number first, whatever their order.
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 30
            while not received and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGINT)
            assert both.wait(30)
    finally:
        for sig, old in before.items():
            signal.signal(sig, old)
    assert received == [signal.SIGTERM, signal.SIGINT]


def test_node_0_that_went_away_is_not_a_rendezvous_that_never_answered():
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

    args = ["--rdzv-endpoint", "10.0.0.1:29500"]
    went = rendezvous_failure(RendezvousConnectionError("closed"), args, 30, gone=True)
    assert went.startswith("the rendezvous host at 10.0.0.1:29500 (node 0) went away: its "
                           "connection closed") and "within" not in went
    never = rendezvous_failure(RendezvousConnectionError("no answer"), args, 30)
    assert never.startswith("no rendezvous answered at 10.0.0.1:29500 within 30 s")


@pytest.mark.compat  # torch's private timer: the GPU machine's torch 2.11 has it too
def test_a_keep_alive_timer_freed_on_its_own_thread_prints_nothing_once_stopped(monkeypatch):
    """torchrun's rendezvous handler after a stop signal: its keep-alive thread holds the last
    reference while it beats, so the handler (and its timer) is freed on that thread, whose
    finalizer would join the thread it runs on ("Exception ignored in: <finalize object>")."""
    from torch.distributed.elastic.rendezvous.utils import _PeriodicTimer

    ignored: list = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    beating, let_go, done = threading.Event(), threading.Event(), threading.Event()

    class Handler:  # what dynamic_rendezvous.py's handler does: the beat holds a weak reference
        pass

    def beat(ref: weakref.ref) -> None:
        me = ref()  # a strong reference for the beat's length, as `_keep_alive_weak` takes
        if me is None:
            return
        beating.set()
        let_go.wait(10)
        del me  # the last reference: the handler is freed on this thread
        done.set()

    handler = Handler()
    handler.timer = _PeriodicTimer(timedelta(milliseconds=10), beat, weakref.ref(handler))
    handler.timer.start()
    assert beating.wait(10)
    stop_keep_alive_threads()  # what the launcher does after torchrun's SignalException
    del handler
    let_go.set()
    assert done.wait(10)
    time.sleep(0.1)  # the thread's last steps after the beat
    assert [str(hook.exc_value) for hook in ignored] == []


def test_a_worker_whose_launcher_already_left_says_nothing_of_its_start_up_stop(
        monkeypatch, capsys):
    """The launcher said the one line and left before this still-starting worker got its
    signal (torchrun's agent did not wait for it): the worker must not add a second line."""
    from common import status
    from train.__main__ import _say_startup

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv(status.STATUS_ENV, "/nonexistent/dptrain-status.json")
    monkeypatch.setenv(status.PARENT_ENV, str(os.getppid() + 1))  # not our parent: it left
    _say_startup(signal.SIGTERM)
    monkeypatch.delenv(status.STATUS_ENV)  # no launcher (torchrun or python started it)
    _say_startup(signal.SIGTERM)
    assert capsys.readouterr().err.splitlines() == [
        "interrupted by SIGTERM during start-up: nothing was trained yet"]
