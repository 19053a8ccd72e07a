"""What the matrix's spawned ranks run (importable by name): several short trainings in turn in
one set of processes, as torchrun's restarts do it: one store for the job (hosted here by rank
0, as torchrun's agent hosts it), a fresh process group per training under its own key prefix
(TORCHELASTIC_RESTART_COUNT, train/dist.py). Each training is the production entry point
(`train.worker.train`); `make eval` and `make export` are their own entry points' functions.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import Dataset

from train import dist
from train.config import load_config

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "default.yaml"
STOP = 3  # the step a stop is left at: inside the 4-step epoch (checkpoint.every_steps=3)
TORCHRUN = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class Pairs(Dataset):
    """A python dataset (data.name=python): (uint8 CHW image, label) pairs."""

    classes = ["a", "b", "c"]

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1000 + i)
        return torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8, generator=g), i % 3


def python_dataset() -> tuple[Pairs, Pairs]:
    return Pairs(48, 0), Pairs(21, 1)


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """This rank as a process without torchrun's variables (mode dp, the one-process
    reference, `make export`): no process group."""
    saved = {k: os.environ.pop(k) for k in TORCHRUN if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


class Pool:
    """This rank's side of the shared job: a new attempt number per process group."""

    def __init__(self) -> None:
        self.attempt = 0
        self.store = None
        os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"
        if os.environ["RANK"] == "0":  # the job's store, for every training that follows
            self.store = torch.distributed.TCPStore(
                "127.0.0.1", int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                is_master=True, wait_for_workers=False)

    def next_attempt(self) -> None:
        self.attempt += 1
        os.environ["TORCHELASTIC_RESTART_COUNT"] = str(self.attempt)


def train_once(overrides: list[str]) -> None:
    from train.worker import train

    cfg = load_config(CONFIG, overrides)
    ctx = dist.setup(cfg.dist)
    try:
        train(cfg, ctx)
    finally:
        dist.teardown(ctx)


def last(run_dir: Path) -> dict:
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    return {k: v for k, v in state.items() if k in ("model", "ema", "optimizer", "step")}


def cut_after(run_dir: Path, step: int) -> None:
    """The run as a stop after `step` left it: the later checkpoints (files, DCP folders) and
    last.pt gone, the newest remaining step file is what a resume reads."""
    folder = run_dir / "checkpoints"
    for entry in folder.iterdir():
        later = entry.name.startswith("step_") and int(entry.name[5:13]) > step
        if later or entry.name == "last.pt":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def combination(pool: Pool, job: dict, rank: int, world_size: int) -> dict:
    """Train, cut after step STOP and resume, evaluate and export one combination; rank 0's
    findings (the others return {})."""
    from train.run.sharded import load_model_state_dict

    run_dir = Path(job["run_dir"])
    args = [*job["overrides"], f"run.dir={run_dir}"]
    solo = job["alone"]
    with alone() if solo else contextlib.nullcontext():
        pool.next_attempt()
        train_once(args)
    out: dict = {}
    if rank == 0:
        out["whole"] = last(run_dir)
        out["records"] = (run_dir / "metrics.jsonl").read_text()
        out["at_cut"] = load_model_state_dict(run_dir / "checkpoints" / "step_00000003.pt")
        cut_after(run_dir, STOP)
    with alone() if solo else contextlib.nullcontext():
        pool.next_attempt()  # every rank: rank 0 cut the run before its process group formed
        train_once(args)
    if rank == 0:
        out["resumed"] = last(run_dir)
    out.update(evaluate_and_export(pool, run_dir, rank, solo))
    return out if rank == 0 else {}


def evaluate_and_export(pool: Pool, run_dir: Path, rank: int, solo: bool) -> dict:
    """`make eval` on this pool's workers (mode dp: one), then `make export` on rank 0."""
    from train.after.evaluate import evaluate_worker, report
    from train.after.export import export

    checkpoint = run_dir / "checkpoints" / "last.pt"
    out: dict = {}
    if not solo or rank == 0:
        with alone() if solo else contextlib.nullcontext():
            pool.next_attempt()
            result = evaluate_worker(str(run_dir), str(checkpoint), False,
                                     ["dist.device=cpu", "wandb.mode=disabled"])
        if rank == 0:
            out["eval"] = {k: v for k, v in report(result, run_dir, checkpoint, False).items()
                           if k != "per_class_accuracy"}
    if rank == 0:
        with alone():
            meta = export(run_dir, checkpoint, False, run_dir / "export", [])
        out["export"] = meta
        out["exported"] = torch.load(run_dir / "export" / "model.pt", weights_only=True)
    return out


def reference(pool: Pool, job: dict) -> dict:
    """One process, no process group: the parity reference of a combination."""
    with alone():
        train_once([*job["overrides"], f"run.dir={job['run_dir']}"])
    return last(Path(job["run_dir"]))


def run_pool(jobs: list[dict]) -> list[dict]:
    """Every job in turn on every rank of this pool; each job's rank-0 findings."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    pool = Pool()
    results = []
    for job in jobs:
        try:
            if job.get("reference"):
                found = reference(pool, job) if rank == 0 else {}
            else:
                found = combination(pool, job, rank, world_size)
        except Exception as exc:
            raise RuntimeError(f"combination {job['name']} (rank {rank}): "
                               f"{type(exc).__name__}: {exc}") from exc
        results.append(found)
    return results


def finite(records: str) -> bool:
    import json

    losses = [json.loads(line).get("train_loss") for line in records.splitlines()]
    return bool(losses) and all(v is not None and math.isfinite(v) for v in losses)
