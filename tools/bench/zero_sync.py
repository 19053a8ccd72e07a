"""ZeRO's parameter broadcast after each step (`ddp.zero=true`): torch's
ZeroRedundancyOptimizer with `parameters_as_bucket_view` off (one broadcast per parameter) and
on (each rank's parameters live in one flat bucket: one broadcast per rank), measured.

Two gloo workers on the CPU, through DDP as `make train` wraps the model (contiguous
parameters, as on GPU workers): broadcasts counted around torch.distributed.broadcast (the real
call runs), optimizer-step time (median, milliseconds) and whether both give the same
parameters, bitwise.

    python -m tools.bench.zero_sync [--model resnet18] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

WARMUP = 3


def measure(model_name: str, steps: int, bucket_view: bool) -> dict:
    """One rank: train `steps` steps of SGD with momentum under DDP + ZeRO."""
    import torch.distributed as tdist
    import torch.nn.functional as F
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    from models import build_model

    tdist.init_process_group("gloo")
    try:
        torch.manual_seed(0)
        # Contiguous parameters, as on GPU workers: the layout in which train/strategies/zero.py
        # turns the bucket view on (its flat buckets would drop channels_last).
        plain = build_model(model_name, 1, 10, 28)
        model = DistributedDataParallel(plain)
        optimizer = ZeroRedundancyOptimizer(
            plain.parameters(), optimizer_class=torch.optim.SGD, lr=0.05, momentum=0.9,
            parameters_as_bucket_view=bucket_view)
        real, calls, times = tdist.broadcast, [0], []

        def counted(*args, **kwargs):
            calls[0] += 1
            return real(*args, **kwargs)

        generator = torch.Generator().manual_seed(tdist.get_rank())
        for step in range(WARMUP + steps):
            images = torch.randn(16, 1, 28, 28, generator=generator)
            labels = torch.randint(0, 10, (16,), generator=generator)
            F.cross_entropy(model(images), labels).backward()
            tdist.broadcast = counted if step >= WARMUP else real
            started = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - started)
            tdist.broadcast = real
            optimizer.zero_grad(set_to_none=True)
        return {"broadcasts_per_step": calls[0] / steps,
                "step_ms": 1000 * statistics.median(times[WARMUP:]),
                "parameters": len(list(plain.parameters())),
                "final": [p.detach().clone() for p in plain.parameters()]}
    finally:
        tdist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    from common.spawn import spawn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    results = {view: spawn(measure, 2, args.model, args.steps, view, timeout=3600)[0]
               for view in (False, True)}
    same = all(torch.equal(a, b) for a, b in zip(results[False]["final"],
                                                  results[True]["final"], strict=True))
    for view, result in results.items():
        print(json.dumps({"parameters_as_bucket_view": view, "model": args.model,
                          "parameters": result["parameters"],
                          "broadcasts_per_step": result["broadcasts_per_step"],
                          "optimizer_step_ms": round(result["step_ms"], 2)}))
    print(json.dumps({"bitwise_equal_parameters": same}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
