"""The doctor's rows that compare the nodes of a job (their facts come from launch/peers.py):
the usual causes of a multi-node job that hangs at its first collective, or never starts.

- nodes: every node's doctor reported (a node rank given twice is a FAIL);
- versions: the same torch, CUDA, NCCL (and Python) everywhere;
- network interface: the interface each node reaches node 0 through, and NCCL_SOCKET_IFNAME /
  GLOO_SOCKET_IFNAME naming interfaces the node has; gloo listening on a loopback address
  (a host name that resolves to 127.0.1.1) while the job spans hosts;
- clocks: each node's clock against node 0's. torchrun's rendezvous compares wall clocks across
  nodes: a node whose clock is 3 heartbeats (dist.node_heartbeat_s) behind is taken for dead,
  and the last-call deadline of an elastic rendezvous moves with the clock of whoever set it.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable

from common.host import backend_for
from launch.checks import FAIL, OK, SKIP, WARN, Verdict
from launch.job import Job
from launch.peers import exchange_for, exchange_timeout

CLOCK_WARN_S = 0.5  # logs and checkpoints of different nodes interleave wrongly
VERSION_KEYS = (("torch", "torch"), ("cuda", "CUDA"), ("nccl", "NCCL"), ("python", "Python"))


def comparing(check: Callable[[Job, dict[int, dict]], Verdict]) -> Callable[[Job], Verdict]:
    """A row that compares the facts (node rank -> facts, in rank order) of the nodes whose
    doctors reported; SKIP when there is nothing to compare."""
    @functools.wraps(check)
    def row(job: Job) -> Verdict:
        if job.dp or not job.nodes.several:
            return SKIP, "single node: nothing to compare"
        found = exchange_for(job)
        if len(found.facts) < 2:
            return SKIP, "no other node's doctor reported (see the nodes row)"
        return check(job, dict(sorted(found.facts.items())))

    return row


def check_nodes(job: Job) -> Verdict:
    if job.dp or not job.nodes.several:
        return SKIP, "single node"
    if not job.args.master_addr:
        return SKIP, "no --master-addr given (the rendezvous port row says what to do)"
    found = exchange_for(job)
    if found.problem:
        return WARN, (f"{found.problem}: the nodes were not compared; start `make doctor` with "
                      f"the same MASTER_ADDR/MASTER_PORT on every node at about the same time")
    if found.duplicates:
        return FAIL, (f"node rank(s) {', '.join(found.duplicates)} given by two nodes: give each "
                      f"node its own --node-rank (NODE_RANK)")
    names = ", ".join(f"node {r} {f['host']}" for r, f in sorted(found.facts.items()))
    came = f"{len(found.facts)} of {len(found.expected)} node(s) reported in {found.seconds:.1f} s"
    if found.missing:
        missing = ", ".join(map(str, found.missing))
        enough = len(found.facts) >= job.nodes.min
        why = (f"node(s) {missing} never reported within {exchange_timeout(job):.0f} s: start "
               f"`make doctor` on every node at about the same time")
        if job.nodes.elastic and enough:
            why += f" (--nnodes {job.nodes} can start without them)"
        return WARN, f"{came} ({names}); {why}; the rows below compare those that came"
    return OK, f"{came}: {names}"


@comparing
def check_versions(job: Job, facts: dict[int, dict]) -> Verdict:
    problems = []
    for key, label in VERSION_KEYS:
        values = {r: f.get(key) for r, f in facts.items()}
        if len(set(values.values())) > 1:
            problems.append(f"{label} differs: " + ", ".join(
                f"node {r} {v or 'none'}" for r, v in values.items()))
    if problems:
        return FAIL, "; ".join(problems) + ": install the same versions on every node"
    first = next(iter(facts.values()))
    same = ", ".join(f"{label} {first.get(key) or 'none'}" for key, label in VERSION_KEYS)
    return OK, f"{same} on all {len(facts)} nodes"


@comparing
def check_interfaces(job: Job, facts: dict[int, dict]) -> Verdict:
    backend = backend_for(job.kind, job.cfg.dist.backend)
    spans_hosts = len({f["host"] for f in facts.values()}) > 1 or not _loopback(
        job.args.master_addr)
    problems, warnings, routes = [], [], []
    for rank, f in facts.items():
        route = f.get("route", {})
        if "error" in route:
            problems.append(f"node {rank} has no route to MASTER_ADDR ({route['error']})")
            continue
        routes.append(f"node {rank}: {route['interface']} ({route['address']})")
        for name, spec in f.get("env", {}).items():
            matched = matching_interfaces(spec, list(f["interfaces"]),
                                          exact=name == "GLOO_SOCKET_IFNAME")
            if not matched:
                problems.append(f"node {rank}: {name}={spec} matches none of its interfaces "
                                f"({', '.join(f['interfaces'])})")
            elif route["interface"] not in matched and name.startswith(backend.upper()):
                warnings.append(f"node {rank}: {name}={spec} picks {', '.join(matched)}, but "
                                f"node 0 is reached through {route['interface']}")
        gloo_at = f.get("gloo_address")
        if (backend == "gloo" and spans_hosts and "GLOO_SOCKET_IFNAME" not in f.get("env", {})
                and gloo_at and _loopback(gloo_at)):
            problems.append(f"node {rank}: its host name {f['host']} resolves to {gloo_at}, so "
                            f"gloo would listen on loopback where no other node can reach it; "
                            f"set GLOO_SOCKET_IFNAME={route['interface']}")
    detail = "; ".join(routes)
    if problems:
        return FAIL, "; ".join(problems) + f" (routes: {detail})"
    if warnings:
        return WARN, "; ".join(warnings) + f" (routes: {detail})"
    return OK, detail


@comparing
def check_clocks(job: Job, facts: dict[int, dict]) -> Verdict:
    limit = float(job.cfg.dist.node_heartbeat_s)
    parts, worst = [], 0.0
    for rank, f in facts.items():
        if rank == 0 or f.get("clock_offset_s") is None:
            continue
        offset, error = f["clock_offset_s"], f["clock_error_s"]
        worst = max(worst, abs(offset) - error)
        parts.append(f"node {rank} {offset:+.3f} s (+-{error:.3f})")
    detail = "against node 0: " + ", ".join(parts)
    if worst >= limit:
        return FAIL, (f"{detail}: torchrun's rendezvous compares wall clocks across nodes (a "
                      f"node {3 * limit:.0f} s behind is taken for dead); synchronize the "
                      f"clocks (NTP, chrony)")
    if worst >= CLOCK_WARN_S:
        return WARN, f"{detail}: logs of different nodes will not line up; synchronize them"
    return OK, detail


def matching_interfaces(spec: str, names: list[str], exact: bool = False) -> list[str]:
    """The interfaces a NCCL_SOCKET_IFNAME-style `spec` selects: a comma list of prefixes, `=`
    for exact names, `^` to exclude. GLOO_SOCKET_IFNAME takes exact names only (`exact`)."""
    exclude = spec.startswith("^")
    spec = spec.removeprefix("^")
    exact = exact or spec.startswith("=")
    parts = [p for p in spec.removeprefix("=").split(",") if p]

    def hit(name: str) -> bool:
        return any(name == p if exact else name.startswith(p) for p in parts)

    return [n for n in names if hit(n) != exclude]


def _loopback(address: str | None) -> bool:
    try:
        return ipaddress.ip_address(address or "").is_loopback
    except ValueError:
        return address == "localhost"

