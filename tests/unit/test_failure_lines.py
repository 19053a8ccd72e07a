"""What a failure's one line claims must be what happened: a peer that exited is no wait that
ran out, the first of two stop signals is the cause, node 0 that went away is no rendezvous
that never answered."""

from __future__ import annotations

import os
import signal
import threading
import time
from types import SimpleNamespace

import torch

from common.signals import held_for_children
from launch.agent import rendezvous_failure
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
