"""`python -m launch.doctor [launcher flags] CONFIG [key=value ...]`: what would go wrong, before
launching.

Takes exactly the launcher's arguments, runs every check (unlike the launcher, which stops at
the first problem) and prints one row per check: OK, WARN (the job may still run), FAIL (it
would not) or SKIP (does not apply). Exit 1 when a check fails, 0 otherwise; 2 when the config
itself cannot be loaded. The rows are the launcher's own checks (launch/checks.py), run
without changing anything, plus those only the doctor makes: node 0 reachable from this
node, the nodes' versions, network interfaces and clocks compared (launch/node_checks.py, from
an exchange between the doctors of every node: launch/peers.py), and a real allreduce between
two processes.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import sys
from collections.abc import Callable

from common.collectives import time_collective
from common.errors import EXIT_USER_ERROR, UserError
from common.host import backend_for, leave, visible_gpus
from common.spawn import SpawnError, spawn
from common.validate import SECTIONS
from launch.checks import CHECKS, FAIL, OK, SKIP, WARN, Verdict, run_check
from launch.cli import parse_args
from launch.job import Job, describe, plan_job
from launch.net import CONNECT_TIMEOUT_S, can_bind, resolve, why
from launch.node_checks import check_clocks, check_interfaces, check_nodes, check_versions
from launch.peers import exchange_for

ALLREDUCE_BYTES = 4 * 2**20  # float32, the size of a small gradient bucket
ALLREDUCE_REPEATS = 5
ALLREDUCE_TIMEOUT_S = 60.0  # process start, rendezvous and every all_reduce, all together


def check_master(job: Job) -> Verdict:
    """Several nodes: node 0 must own MASTER_ADDR; the others must reach it."""
    if not job.nodes.several:
        return SKIP, "single node: the rendezvous is on 127.0.0.1"
    host, port = job.args.master_addr, job.master_port
    if not host:
        return SKIP, "no --master-addr given (the rendezvous port row says what to do)"
    if job.args.node_rank > 0 and exchange_for(job).problem is None:
        return OK, f"{host}:{port} answered: node 0's doctor hosted the exchange there"
    try:
        addresses = resolve(host, port)
    except OSError as exc:
        return FAIL, f"MASTER_ADDR {host!r} does not resolve ({why(exc)})"
    if job.args.node_rank == 0:
        return _check_own_address(host, addresses)
    try:
        with socket.create_connection((addresses[0], port), timeout=CONNECT_TIMEOUT_S):
            return OK, f"{host}:{port} ({addresses[0]}) accepts connections"
    except OSError as exc:
        if exc.errno == errno.ENETUNREACH:
            return FAIL, f"no route from this machine to {host} ({addresses[0]}): {why(exc)}"
        return WARN, (f"nothing listens there yet ({host}:{port}: {why(exc)}): start node 0 "
                      f"first; if it is up, check the address, the port and firewalls")


def _check_own_address(host: str, addresses: list[str]) -> Verdict:
    own = [a for a in addresses if can_bind(a)]
    if not own:
        named = "" if addresses == [host] else f" is {', '.join(addresses)}"
        return FAIL, (f"MASTER_ADDR is not an address of this machine ({host}{named}): node 0 "
                      f"hosts the rendezvous there; give node 0's own address")
    if ipaddress.ip_address(own[0]).is_loopback:
        return WARN, (f"{host} ({own[0]}) is a loopback address: only nodes on this machine "
                      f"can reach it; give the address the other nodes use")
    return OK, f"{host} ({own[0]}) is an address of this machine"


def check_allreduce(job: Job) -> Verdict:
    """A real all_reduce between two fresh processes, with the planned backend when possible."""
    if job.dp:
        return SKIP, "mode dp: one process, no collective between processes"
    backend = backend_for(job.kind, job.cfg.dist.backend)
    device, note = ("cuda" if backend == "nccl" else "cpu"), ""
    if backend == "nccl" and visible_gpus() < 2:
        backend, device = "gloo", "cpu"
        note = f"; nccl needs 2 GPUs for this test ({visible_gpus()} visible): gloo on the CPU"
    if job.nodes.several:
        note += "; on this node only (between nodes it is first exercised at launch)"
    try:
        seconds = spawn(timed_allreduce, 2, backend, device, ALLREDUCE_BYTES,
                        timeout=ALLREDUCE_TIMEOUT_S)[0]
    except SpawnError as exc:
        first = str(exc).strip().splitlines()
        last = first[-1] if first else str(exc)
        return FAIL, f"{backend} all_reduce between 2 processes failed: {last}"
    algbw = ALLREDUCE_BYTES / seconds
    busbw = algbw * 2 * (2 - 1) / 2  # nccl-tests: each rank sends 2(n-1)/n of the data
    return OK, (f"{backend}, 2 x {device}, {ALLREDUCE_BYTES / 2**20:.0f} MiB float32: "
                f"{seconds * 1e3:.2f} ms, algbw {algbw / 1e9:.2f} GB/s, busbw {busbw / 1e9:.2f} "
                f"GB/s (median of {ALLREDUCE_REPEATS}){note}")


def timed_allreduce(backend: str, device_kind: str, nbytes: int) -> float:
    """In each spawned process: seconds per all_reduce of `nbytes` float32 (the slowest rank's
    median), after checking that a small one sums correctly."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(backend, timeout=timedelta(seconds=30))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank) if device_kind == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        # A wrong sum would be a broken transport: check the values, not only that it returns.
        probe = torch.full((8,), float(rank + 1), device=device)
        dist.all_reduce(probe)
        expected = world_size * (world_size + 1) / 2
        if not bool((probe == expected).all()):
            raise RuntimeError(f"all_reduce summed to {probe[0].item()}, expected {expected}")
        data = torch.zeros(nbytes // 4, device=device)
        return time_collective(lambda: dist.all_reduce(data), device, ALLREDUCE_REPEATS)
    finally:
        dist.destroy_process_group()


# The launcher's checks in the table's order, with the doctor's own among them. "nodes" hosts
# (node 0) or joins the exchange between the nodes' doctors: after node 0's port check, before
# the rows that compare what it brought.
ROWS: list[tuple[str, Callable[[Job], Verdict]]] = [
    *((name, CHECKS[name]) for name in ("GPUs", "cores", *SECTIONS, "restarts",
                                        "initial weights", "backend", "rendezvous port")),
    ("nodes", check_nodes),
    ("master reachable", check_master),
    ("versions", check_versions),
    ("network interface", check_interfaces),
    ("clocks", check_clocks),
    ("allreduce", check_allreduce),
    *((name, CHECKS[name]) for name in ("dataset", "pretrained weights", "wandb", "disk",
                                        "run folder")),
]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        job = plan_job(args, dry=True)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"doctor: {describe(job)}", flush=True)
    width = max(len(name) for name, _ in ROWS)
    print(f"{'check':<{width}} | verdict | detail", flush=True)
    verdicts = []
    for name, fn in ROWS:
        verdict, detail = run_check(fn, job)
        verdicts.append(verdict)
        print(f"{name:<{width}} | {verdict:<7} | {detail}", flush=True)
    problems, warnings = verdicts.count(FAIL), verdicts.count(WARN)
    if problems:
        print(f"doctor: {problems} problem(s) would stop the job")
        return 1
    print("doctor: ready to launch" + (f" ({warnings} warning(s))" if warnings else ""))
    return 0


if __name__ == "__main__":
    leave(main())  # without the interpreter's teardown (common/host.py)
