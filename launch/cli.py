"""The launcher's command line, shared by `python -m launch` and `python -m launch.doctor`."""

from __future__ import annotations

import argparse
import os
import sys

from launch.operator_env import apply_operator_env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m launch",
        description="Start one training worker per GPU (or CPU workers when there is none) "
                    "through torchrun.")
    p.add_argument("--gpus", "--nproc-per-node", type=int, default=None, metavar="N",
                   help="worker processes on this node, one per GPU (default: PET_NPROC_PER_NODE, "
                        "else every visible GPU, or 2 CPU workers when there is none)")
    p.add_argument("--cpu", action="store_true",
                   help="CPU workers with gloo even when GPUs are visible")
    p.add_argument("--mode", choices=["ddp", "dp", "scratch", "fsdp"], default=None,
                   help="gradient synchronization path (default: the config's `mode`)")
    p.add_argument("--max-restarts", type=int, default=0, metavar="K",
                   help="restart the worker group up to K times after a failure; each restart "
                        "resumes from the latest checkpoint (default 0)")
    p.add_argument("--nnodes", default=None, metavar="N|MIN:MAX",
                   help="nodes in the job (default: the Kubernetes operator's PET_NNODES or "
                        "WORLD_SIZE, else 1); MIN:MAX for an elastic job, which goes "
                        "on when nodes leave (down to MIN) or join (up to MAX)")
    p.add_argument("--node-rank", type=int, default=None,
                   help="this node's index, 0..nnodes-1 (0..MAX-1); node 0 hosts the rendezvous "
                        "(default: PET_NODE_RANK or RANK, else 0)")
    p.add_argument("--master-addr", default=None,
                   help="address of node 0, reachable from every node (several nodes; default: "
                        "PET_MASTER_ADDR or MASTER_ADDR)")
    p.add_argument("--master-port", type=int, default=None,
                   help="rendezvous port on node 0 (default: a free one on a single node, "
                        "PET_MASTER_PORT or MASTER_PORT, else 29500 on several)")
    p.add_argument("--verbose", action="store_true", help="show torchrun's own log lines")
    p.add_argument("config", help="YAML config, e.g. configs/default.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.epochs=3 optim.lr=0.1")
    args = p.parse_intermixed_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to say how to run it again
    # A Kubernetes operator's variables fill the node flags not given (launch/operator_env.py).
    args.operator = apply_operator_env(args, os.environ)
    return args
