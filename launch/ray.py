"""`python -m launch.ray [--workers N] [--gpu] [--max-failures K] [--storage PATH] CONFIG
[key=value ...]`: the same workers inside Ray Train (docs/ray.md).

The driver plans the job as the launcher does (every check, the run folder's name), then runs
a `TorchTrainer` (`ScalingConfig(num_workers, use_gpu)`, `RunConfig(storage_path,
failure_config=FailureConfig(max_failures))`). Each Ray worker starts `python -m train`, the
entry torchrun starts, with the rank, world size and local rank Ray gives it and a rendezvous
on Ray's rank 0 (its address from Ray's own process group): run folder, checkpoints, resume,
metrics and wandb are the workers' own, as under torchrun. A worker that fails (a crash, a
SIGKILL) fails Ray's worker group; Ray starts a new group (up to `--max-failures` times) and
its workers resume from our last checkpoint. Ray's own checkpoints are not used.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
from pathlib import Path

from common.errors import EXIT_USER_ERROR, UserError
from common.signals import hold_in_child
from common.spawn import free_port
from launch.cli import parse_args as launcher_args
from launch.plan import REPO_ROOT, make_plan, worker_environment


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.ray",
                                description="Run the training workers inside Ray Train.")
    p.add_argument("--workers", type=int, default=2, help="Ray workers in all (default 2)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (default: CPU, gloo)")
    p.add_argument("--max-failures", type=int, default=0, metavar="K",
                   help="worker-group failures Ray survives, each resuming (default 0)")
    p.add_argument("--storage", default=None,
                   help="Ray's storage_path (its own results; default runs/ray); shared by "
                        "every node of a Ray cluster, as run.dir must be")
    p.add_argument("config", help="YAML config, e.g. configs/default.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p.parse_intermixed_args(argv)


def run_worker(config: dict) -> None:
    """One Ray worker: `python -m train` with torchrun's variables; fails if it fails."""
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    # Our own rendezvous on Ray's rank 0 host, on a port free there: Ray's process group
    # (already set up in this process) carries the address to the others.
    where = [(os.environ.get("MASTER_ADDR", "127.0.0.1"), free_port()) if rank == 0 else None]
    dist.broadcast_object_list(where, src=0)
    addr, port = where[0]
    env = {**os.environ, **config["env"], "RANK": str(rank),
           "WORLD_SIZE": str(ctx.get_world_size()), "LOCAL_RANK": str(ctx.get_local_rank()),
           "LOCAL_WORLD_SIZE": str(ctx.get_local_world_size()), "MASTER_ADDR": addr,
           "MASTER_PORT": str(port)}
    # It gets SIGTERM if this Ray worker dies (checkpointing when it can), as under torchrun.
    child = subprocess.Popen([sys.executable, "-m", "train", *config["worker_args"]],
                             cwd=REPO_ROOT, env=env,
                             preexec_fn=functools.partial(hold_in_child, os.getpid()))
    code = child.wait()
    if code != 0:
        raise RuntimeError(f"worker rank {rank} (`python -m train`) exited with {code}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    flags = ["--gpus", str(args.workers), *([] if args.gpu else ["--cpu"])]
    try:
        plan = make_plan(launcher_args([*flags, args.config, *args.overrides]))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Ray's workers import run_worker from this repo: a local Ray's processes inherit this.
    os.environ["PYTHONPATH"] = worker_environment(plan)["PYTHONPATH"]
    if not os.environ.get("RAY_ADDRESS"):  # no cluster named: a local Ray on this machine
        ray.init(num_cpus=max(os.cpu_count() or 1, args.workers + 1), include_dashboard=False)
    storage = Path(args.storage or REPO_ROOT / "runs" / "ray").absolute()
    trainer = TorchTrainer(
        run_worker,
        train_loop_config={"worker_args": plan.worker_args, "env": worker_environment(plan)},
        torch_config=TorchConfig(backend="nccl" if args.gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.gpu,
                                     resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=plan.cfg.run.name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=args.max_failures)))
    print(f"launch.ray: {args.workers} Ray worker(s), run folder {plan.cfg.run.dir}", flush=True)
    try:
        trainer.fit()
    except Exception as exc:  # Ray's TrainingFailedError and the like: one line
        print(f"error: Ray Train failed after {args.max_failures} restart(s): "
              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
