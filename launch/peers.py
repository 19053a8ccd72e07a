"""The doctor on several nodes: each node's doctor learns the others' facts, so that every one of
them can compare torch/CUDA/NCCL versions, network interfaces and clocks before launch.

A doctor sees only its own node. Node 0's doctor hosts a small TCPStore on
MASTER_ADDR:MASTER_PORT (the port the job's rendezvous will use, free until launch) for at
most `exchange_timeout(job)` seconds; the other doctors connect, measure their clock against
node 0's (three ping/pong round trips through the store, the shortest one kept), publish
their facts under their node rank, and read everyone's once node 0 has heard from all nodes
or given up. A node that never comes is named; the rows compare the nodes that came.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from launch.agent import node0_answers
from launch.job import Job
from launch.net import resolve

EXCHANGE_TIMEOUT_S = 60.0  # at most; dist.rendezvous_timeout_s when shorter
CLOCK_PROBES = 3
READ_GRACE_S = 10.0  # node 0 keeps the store up this long for the others to read
ENV_IFNAMES = ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")
KEY = "dptrain/doctor"


@dataclass
class Exchange:
    """What the doctors learned from each other."""

    facts: dict[int, dict[str, Any]]  # node rank -> that node's facts
    expected: list[int]  # node ranks that should report (0..MAX-1)
    seconds: float  # how long the exchange took
    problem: str | None = None  # why it failed (node 0 never answered, could not host)
    duplicates: list[str] = field(default_factory=list)  # node ranks given twice

    @property
    def missing(self) -> list[int]:
        return [r for r in self.expected if r not in self.facts]


def exchange_timeout(job: Job) -> float:
    return min(EXCHANGE_TIMEOUT_S, job.cfg.dist.rendezvous_timeout_s)


_DONE: dict[int, Exchange] = {}


def exchange_for(job: Job) -> Exchange:
    """The exchange of this doctor run, made once (several rows read it)."""
    if id(job) not in _DONE:
        _DONE[id(job)] = run_exchange(job)
    return _DONE[id(job)]


def run_exchange(job: Job) -> Exchange:
    import torch.distributed as dist

    args, started = job.args, time.monotonic()
    expected = list(range(job.nodes.max))
    mine = node_facts(job)
    timeout = exchange_timeout(job)
    if args.node_rank == 0:
        try:
            store = dist.TCPStore(args.master_addr, job.master_port, is_master=True,
                                  wait_for_workers=False, timeout=timedelta(seconds=timeout))
        except (RuntimeError, OSError) as exc:
            return Exchange({0: mine}, expected, 0.0,
                            f"could not host the exchange on port {job.master_port}: {exc}")
        return _host(store, job, mine, expected, started, timeout)
    return _join(job, mine, expected, started, timeout)


def _host(store: Any, job: Job, mine: dict[str, Any], expected: list[int], started: float,
          timeout: float) -> Exchange:
    """Node 0: answer the clock probes, wait for every node's facts, publish them all."""
    mine.update(clock_offset_s=0.0, clock_error_s=0.0)
    store.set(f"{KEY}/facts/0", json.dumps(mine))
    for rank in expected[1:]:
        threading.Thread(target=_answer_clock, args=(job, rank, timeout), daemon=True).start()
    deadline = started + timeout
    keys = {r: f"{KEY}/facts/{r}" for r in expected}
    while time.monotonic() < deadline and not store.check(list(keys.values())):
        time.sleep(0.1)
    facts = {r: json.loads(store.get(k)) for r, k in keys.items() if store.check([k])}
    duplicates = [str(r) for r in facts if store.check([f"{KEY}/twice/{r}"])]
    store.set(f"{KEY}/all", json.dumps({"facts": facts, "duplicates": duplicates}))
    readers = [f"{KEY}/read/{r}" for r in facts if r != 0]
    until = time.monotonic() + READ_GRACE_S
    while readers and time.monotonic() < until and not store.check(readers):
        time.sleep(0.05)
    return Exchange(facts, expected, time.monotonic() - started, None, duplicates)


def _answer_clock(job: Job, rank: int, timeout: float) -> None:
    """Node 0, one thread per other node: reply to each ping with this node's clock (a
    client of its own: a blocking get holds a store connection)."""
    import torch.distributed as dist

    try:
        store = dist.TCPStore(job.args.master_addr, job.master_port, is_master=False,
                              timeout=timedelta(seconds=timeout))
        for k in range(CLOCK_PROBES):
            store.get(f"{KEY}/ping/{rank}/{k}")
            store.set(f"{KEY}/pong/{rank}/{k}", repr(time.time()))
    except (RuntimeError, OSError):
        return  # that node never came: the exchange says so


def _join(job: Job, mine: dict[str, Any], expected: list[int], started: float,
          timeout: float) -> Exchange:
    """Another node: wait for node 0's store, probe the clock, publish, read everyone's."""
    import torch.distributed as dist

    where = f"{job.args.master_addr}:{job.master_port}"
    try:
        resolve(job.args.master_addr, job.master_port)
    except OSError as exc:
        return Exchange({job.args.node_rank: mine}, expected, time.monotonic() - started,
                        f"MASTER_ADDR {job.args.master_addr!r} does not resolve ({exc})")
    if not node0_answers(where, timeout):  # torch's client would print a C++ trace per retry
        return Exchange({job.args.node_rank: mine}, expected, time.monotonic() - started,
                        f"node 0's doctor did not answer at {where} within {timeout:.0f} s")
    remaining = max(1.0, started + timeout + READ_GRACE_S - time.monotonic())
    try:
        store = dist.TCPStore(job.args.master_addr, job.master_port, is_master=False,
                              timeout=timedelta(seconds=remaining))
        rank = job.args.node_rank
        mine.update(zip(("clock_offset_s", "clock_error_s"), _probe_clock(store, rank),
                        strict=True))
        text = json.dumps(mine)
        if store.compare_set(f"{KEY}/facts/{rank}", "", text).decode() != text:
            store.set(f"{KEY}/twice/{rank}", "1")
        shared = json.loads(store.get(f"{KEY}/all"))
        store.set(f"{KEY}/read/{rank}", "1")
    except (RuntimeError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return Exchange({job.args.node_rank: mine}, expected, time.monotonic() - started,
                        f"the exchange with node 0's doctor at {where} broke off ({first})")
    facts = {int(r): f for r, f in shared["facts"].items()}
    return Exchange(facts, expected, time.monotonic() - started, None, shared["duplicates"])


def _probe_clock(store: Any, rank: int) -> tuple[float, float]:
    """(offset of node 0's clock from this node's, its error bound), in seconds."""
    samples = []
    for k in range(CLOCK_PROBES):
        sent = time.time()
        store.set(f"{KEY}/ping/{rank}/{k}", "1")
        theirs = float(store.get(f"{KEY}/pong/{rank}/{k}"))
        back = time.time()
        samples.append((back - sent, theirs - (sent + back) / 2))
    rtt, offset = min(samples)
    return -offset, rtt / 2  # this node's clock minus node 0's


def node_facts(job: Job) -> dict[str, Any]:
    """What this node would bring to the job: versions, interfaces, names."""
    import torch

    nccl = None
    if torch.cuda.is_available() or torch.version.cuda:
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except (RuntimeError, AttributeError):
            nccl = None
    facts: dict[str, Any] = {
        "host": socket.gethostname(), "python": sys.version.split()[0],
        "torch": torch.__version__, "cuda": torch.version.cuda, "nccl": nccl,
        "interfaces": interface_names(), "route": route_to(job.args.master_addr,
                                                           job.master_port),
        "gloo_address": hostname_address(),
    }
    facts["env"] = {name: os.environ[name] for name in ENV_IFNAMES if os.environ.get(name)}
    return facts


def interface_names() -> dict[str, list[str]]:
    """Interface name -> its IPv4/IPv6 addresses."""
    import psutil

    families = (socket.AF_INET, socket.AF_INET6)
    return {name: [a.address.split("%")[0] for a in addresses if a.family in families]
            for name, addresses in psutil.net_if_addrs().items()}


def route_to(host: str, port: int) -> dict[str, str]:
    """The interface and local address this node's traffic to `host` leaves from."""
    try:
        address = resolve(host, port)[0]
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((address, port))  # UDP: picks the route, sends nothing
            local = probe.getsockname()[0]
    except OSError as exc:
        return {"error": str(exc)}
    name = next((n for n, addrs in interface_names().items() if local in addrs), "?")
    return {"interface": name, "address": local}


def hostname_address() -> str | None:
    """Where gloo listens without GLOO_SOCKET_IFNAME: the address the host name resolves to."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return None
