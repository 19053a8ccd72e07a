"""Memory per rank: parameter, gradient and optimizer-state bytes of ddp, ddp with ZeRO
(`ddp.zero=true`) and fsdp, with 2 and 4 workers. Target: ZeRO's optimizer state and fsdp's
total at most 1/N of DDP's, plus 5%.

Each configuration runs in real processes (gloo on the CPU: the tensors, and so the bytes, are
those GPU workers would hold) through the training strategies and optimizer of `make train`:
build, wrap, one forward/backward/step of SGD with momentum, then count the bytes of the
storages this rank holds at rest (between steps): its parameters (FSDP: its padded shards),
their gradients (DDP: its buckets) and the optimizer's state (ZeRO, FSDP: its own shard's).
Storages shared by several tensors are counted once. What FSDP gathers for one block's forward
or backward and frees again right after is transient and not counted.

    python -m tools.bench.memory [--model resnet18] [--workers 2,4] [--out reports/memory]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from common.spawn import spawn
from models import build_model
from tools.bench.report import memory_lines
from train import dist
from train.config import load_config
from train.optim import build_optimization
from train.strategies import make_strategy

REPO = Path(__file__).resolve().parents[2]
PATHS = {"ddp": ["mode=ddp"], "zero": ["mode=ddp", "ddp.zero=true"], "fsdp": ["mode=fsdp"]}
KINDS = ("parameters", "gradients", "optimizer")
GOAL = 1.05  # at most 1/N of DDP's, plus 5%


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind `tensors` (a DTensor: this rank's local piece)."""
    from torch.distributed.tensor import DTensor

    storages: dict[int, int] = {}
    for tensor in tensors:
        if tensor is None:
            continue
        if isinstance(tensor, DTensor):
            tensor = tensor.to_local()
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def footprint(overrides: list[str]) -> dict[str, int]:
    """In a worker process: this rank's bytes after one training step of `overrides`' path."""
    import torch.nn.functional as F

    cfg = load_config(REPO / "configs" / "default.yaml", ["dist.device=cpu", *overrides])
    ctx = dist.setup(cfg.dist)
    try:
        strategy = make_strategy(cfg, ctx)
        torch.manual_seed(cfg.seed)
        plain = build_model(cfg.model.name, 1, 10, 28, init=cfg.model.init)
        model = strategy.wrap(plain)
        optim = build_optimization(cfg.optim, "fp32", plain, cfg.train.batch_size, 10, 10,
                                   "cpu", strategy)
        images, labels = torch.randn(2, 1, 28, 28), torch.randint(0, 10, (2,))
        F.cross_entropy(model(images), labels).backward()
        strategy.sync_gradients(model)
        optim.step()
        local = getattr(optim.optimizer, "optim", optim.optimizer)  # ZeRO: this rank's optimizer
        state = [v for s in local.state.values() for v in s.values() if torch.is_tensor(v)]
        params = list(plain.parameters())
        return {"parameters": storage_bytes(params),
                "gradients": storage_bytes(p.grad for p in params),
                "optimizer": storage_bytes(state)}
    finally:
        dist.teardown(ctx)


def measure(model: str = "resnet18", workers: Iterable[int] = (2, 4)) -> dict[str, Any]:
    """{"rows": [{path, workers, <kind>: max bytes over ranks, total, ...}], "targets": ...}"""
    rows = []
    for n in workers:
        for path, overrides in PATHS.items():
            ranks = spawn(footprint, n, [*overrides, f"model.name={model}"], timeout=600)
            row: dict[str, Any] = {"path": path, "workers": n}
            row.update({kind: max(r[kind] for r in ranks) for kind in KINDS})
            row["total"] = max(sum(r[kind] for kind in KINDS) for r in ranks)
            rows.append(row)
            print(f"bench: memory {model} {path} x{n}: " + ", ".join(
                f"{kind} {row[kind] / 2**20:.2f} MiB" for kind in (*KINDS, "total")), flush=True)
    for row in rows:  # against DDP's per-rank bytes divided by N
        ddp = next(r for r in rows if r["path"] == "ddp" and r["workers"] == row["workers"])
        row["optimizer_vs_ideal"] = row["optimizer"] / (ddp["optimizer"] / row["workers"])
        row["total_vs_ideal"] = row["total"] / (ddp["total"] / row["workers"])
    zero = max(r["optimizer_vs_ideal"] for r in rows if r["path"] == "zero")
    fsdp = max(r["total_vs_ideal"] for r in rows if r["path"] == "fsdp")
    return {"model": model, "rows": rows, "zero_optimizer_vs_ideal": zero,
            "fsdp_total_vs_ideal": fsdp, "goal": GOAL}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--workers", default="2,4", help="comma-separated worker counts")
    parser.add_argument("--out", default=str(REPO / "reports" / "memory"))
    args = parser.parse_args(argv)
    result = measure(args.model, [int(n) for n in args.workers.split(",")])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(result, indent=2) + "\n")

    print("\n".join(memory_lines({"memory": result})))
    print(f"written: {out / 'memory.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
