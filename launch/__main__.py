"""`python -m launch [--gpus N] [--cpu] [--nnodes N --node-rank R --master-addr H --master-port P]
CONFIG [key=value ...]`: check the job, then run torchrun's agent in this process.

parse -> plan (every check) -> say what will run -> torchrun (or one dp process) -> one line
on failure.
"""

from __future__ import annotations

from common.host import pause_collector, resume_collector
from common.signals import exit_during_startup
from common.torch_support import refuse_unsupported_torch

if __name__ == "__main__":
    # First, before the slow imports and checks: a stop signal before any worker exists is one
    # line and exit 130 (torchrun's agent takes the signals over once it starts workers).
    exit_during_startup("launch: ")
    pause_collector()  # until the imports below are done (common/host.py)
    # A torch older than the supported minimum is one line and exit 2, before any import
    # that may fail on it with a traceback.
    refuse_unsupported_torch()

import os  # noqa: E402 - after the signal handlers
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from common.errors import EXIT_USER_ERROR, UserError  # noqa: E402
from common.host import leave  # noqa: E402
from launch.agent import node0_answers, node0_silent, run_one_process, run_torchrun  # noqa: E402
from launch.cli import parse_args  # noqa: E402
from launch.plan import abort_note, make_plan, worker_environment  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plan = make_plan(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    os.environ.update(worker_environment(plan))
    if args.operator:
        print(f"launch: nodes {args.operator}", flush=True)
    for note in plan.notes:
        print(f"launch: {note}", flush=True)
    if not plan.torchrun_args:
        print(f"launch: {plan.note}", flush=True)
        return run_one_process(plan.worker_args)
    total = (f"{plan.nproc * plan.min_nodes} to {plan.world_size}" if plan.elastic
             else str(plan.world_size))
    elastic = f", elastic over {plan.min_nodes} to {plan.nnodes} nodes" if plan.elastic else ""
    print(f"launch: {plan.note}; {total} worker(s) in all, mode {plan.cfg.mode}{elastic}"
          + (f", up to {args.max_restarts} restart(s)" if args.max_restarts else ""), flush=True)
    timeout_s = plan.cfg.dist.rendezvous_timeout_s
    if plan.node_rank > 0 and not node0_answers(plan.rdzv_endpoint, timeout_s):
        print(f"error: {node0_silent(plan.rdzv_endpoint, timeout_s)}", file=sys.stderr)
        return 1
    return run_torchrun(plan.torchrun_args, verbose=args.verbose, rendezvous_timeout_s=timeout_s,
                        abort_note=abort_note(plan), run_dir=Path(plan.cfg.run.dir),
                        backend=plan.backend)


if __name__ == "__main__":
    resume_collector()
    leave(main())
