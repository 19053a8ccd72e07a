"""Functions that tests run inside real worker processes (they must be importable by name)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from train import dist
from train.config import load_config
from train.worker import train

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"


def train_and_return_params(overrides: list[str]) -> dict[str, torch.Tensor]:
    """Train through the production entry point; return the main worker's saved parameters."""
    return train_and_return_state(overrides).get("model", {})


def _trainer(cfg, ctx):
    from train.run.folder import NullRun
    from train.strategies import make_strategy
    from train.worker import build_trainer

    return build_trainer(cfg, ctx, make_strategy(cfg, ctx), NullRun(Path(cfg.run.dir)))


def evaluate_fresh_model(overrides: list[str]) -> dict[str, float]:
    """Build the run exactly as `train` does, then only evaluate (no training step)."""
    cfg = load_config(DEFAULT_CONFIG, overrides)
    ctx = dist.setup(cfg.dist)
    try:
        trainer = _trainer(cfg, ctx)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # Larger weights than the init (varied predictions), the same whole tensors on every
        # rank and in every mode: mode fsdp keeps its shard of each.
        torch.manual_seed(1)
        weights = {k: torch.randn(shape) * 0.1 for k, shape in _plain_shapes(cfg).items()}
        set_model_state_dict(trainer.parts.plain, weights,
                             options=StateDictOptions(full_state_dict=True))
        return trainer.evaluate()
    finally:
        dist.teardown(ctx)


def _plain_shapes(cfg) -> dict[str, torch.Size]:
    from models import build_model

    synthetic = cfg.data.synthetic
    model = build_model(cfg.model.name, synthetic.channels, synthetic.num_classes,
                        synthetic.image_size)
    return {k: v.shape for k, v in model.state_dict().items()}


def agree_on_failure(failing_rank: int) -> str:
    """One rank fails a setup step; every rank must see the error (none waits forever)."""
    from common.errors import UserError
    from common.schema import DistConfig

    ctx = dist.setup(DistConfig(device="cpu"))
    try:
        def step():
            if ctx.rank == failing_rank:
                raise UserError("disk full")
            return "fine"

        try:
            dist.agree(ctx, step)
        except UserError as exc:
            return f"{exc}|agreed={exc.agreed}"
        return "no error"
    finally:
        dist.teardown(ctx)


def ddp_settings(overrides: list[str]) -> dict:
    """Build the trainer as `train` does and report what DDP did with its knobs."""
    cfg = load_config(DEFAULT_CONFIG, overrides)
    ctx = dist.setup(cfg.dist)
    try:
        trainer = _trainer(cfg, ctx)
        batches = trainer.parts.train_data.iterate()
        for _ in range(3):  # DDP rebuilds its buckets after the first iteration
            trainer.train_step(*next(batches))
        data = trainer.parts.model._get_ddp_logging_data()
        sizes = data.get("rebuilt_bucket_sizes") or data["bucket_sizes"]
        return {"bucket_sizes": [int(x) for x in str(sizes).split(",")],
                "static_graph": trainer.parts.model.static_graph,
                "grads_are_bucket_views": [p.grad._base is not None
                                           for p in trainer.parts.plain.parameters()]}
    finally:
        dist.teardown(ctx)



def page_faults_per_step(overrides: list[str]) -> float:
    """A CPU worker set up as `train` sets it up, then steps that free their tensors at the
    end as a training step does: the minor page faults of a step (median).

    80 MiB in blocks of 2 MiB: more than glibc's own limits keep even once a large block
    freed earlier has raised them (64 MiB at most), so its defaults always fault here."""
    import resource
    import statistics

    cfg = load_config(DEFAULT_CONFIG, overrides)
    ctx = dist.setup(cfg.dist)
    try:
        faults = []
        for _ in range(6):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            blocks = [torch.ones(512 * 1024) for _ in range(40)]  # written: pages touched
            del blocks
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return statistics.median(faults[2:])  # once the first steps took their memory
    finally:
        dist.teardown(ctx)


def static_graph_with_no_sync() -> str:
    """DDP(static_graph=True) accumulating over two micro-batches with no_sync(), as the
    trainer would; what happens (the upstream regression pytorch/pytorch#143580)."""
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    torch.distributed.init_process_group("gloo")
    try:
        model = DistributedDataParallel(torch.nn.Linear(4, 2), static_graph=True)
        x, y = torch.randn(8, 4), torch.randint(2, (8,))
        try:
            for _ in range(3):
                with model.no_sync():
                    F.cross_entropy(model(x[:4]), y[:4]).backward()
                F.cross_entropy(model(x[4:]), y[4:]).backward()
        except RuntimeError as exc:
            return str(exc).splitlines()[0]
        return "ok"
    finally:
        torch.distributed.destroy_process_group()


def resume_and_report(overrides: list[str]) -> dict:
    """Resume as `train` does (the trainer built, the newest checkpoint loaded into its parts);
    report where the state landed and whether this rank's RNG came back, then finish training
    from there. `other_gpus_bytes`: what this process holds on GPUs not its own (PITFALLS 4)."""
    import random

    import numpy as np

    from train.run.checkpoint import load
    from train.run.folder import open_run
    from train.run.resume import resume
    from train.strategies import make_strategy
    from train.worker import build_trainer

    cfg = load_config(DEFAULT_CONFIG, overrides)
    ctx = dist.setup(cfg.dist)
    try:
        held = contextlib.ExitStack()  # the run folder's lock, as train.worker holds it
        run = open_run(cfg, ctx, held)
        trainer = build_trainer(cfg, ctx, make_strategy(cfg, ctx), run)
        path = resume(cfg, ctx, trainer.parts.checkpointer, run)
        saved = load(path)["ranks"][ctx.rank]["rng"]
        cuda = ctx.device.type == "cuda"
        rng = {"torch": torch.equal(torch.get_rng_state(), saved["torch"]),
               "numpy": np.array_equal(np.random.get_state()[1], saved["numpy"][1].numpy()),
               "python": list(random.getstate()[1]) == saved["python"][1].tolist()}
        if cuda:
            rng["cuda"] = torch.equal(torch.cuda.get_rng_state(), saved["cuda"])
        momenta = [t for s in trainer.parts.optim.optimizer.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor)]
        report = {
            "device": str(ctx.device), "step": trainer.parts.state.step, "rng": rng,
            "params": sorted({str(p.device) for p in trainer.parts.plain.parameters()}),
            "optimizer": sorted({str(t.device) for t in momenta}), "momenta": len(momenta),
            "other_gpus_bytes": sum(torch.cuda.memory_allocated(i)
                                    for i in range(torch.cuda.device_count())
                                    if i != ctx.device.index) if cuda else 0,
        }
        run.start(cfg, resumed_epochs=trainer.parts.state.epoch)
        trainer.parts.monitor.start()
        try:
            trainer.fit()
        finally:
            trainer.parts.monitor.close()
        report["finished_step"] = trainer.parts.state.step
        held.close()
        return report
    finally:
        dist.teardown(ctx)


def tensor_devices_in_checkpoint(path: str) -> dict[str, list[str]]:
    """In a process that sees the GPUs: load a checkpoint as it was saved (no map_location)
    and say where each top-level part's tensors were saved from."""
    state = torch.load(path, weights_only=True)
    found: dict[str, set[str]] = {}

    def walk(key: str, value) -> None:
        if isinstance(value, torch.Tensor):
            found.setdefault(key, set()).add(value.device.type)
        elif isinstance(value, dict):
            for v in value.values():
                walk(key, v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(key, v)

    for key, value in state.items():
        walk(key, value)
    return {key: sorted(kinds) for key, kinds in found.items()}


def sync_bn_statistics(overrides: list[str]) -> dict:
    """The model built as `train` builds it with model.sync_bn (SyncBatchNorm), wrapped by the
    DDP strategy: one training forward, each rank on its half of a batch. Its running
    statistics against plain BatchNorm on the whole batch in one process, and against plain
    BatchNorm on this rank's half (what per-device statistics would be)."""
    from dataclasses import replace

    from common.schema import SyntheticConfig
    from train.data import make_synthetic
    from train.model import build_plain_model
    from train.strategies import make_strategy

    cfg = load_config(DEFAULT_CONFIG, overrides)
    ctx = dist.setup(cfg.dist)
    try:
        data, _ = make_synthetic(SyntheticConfig(train_samples=32, test_samples=1), cfg.seed)
        x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        mine = x.chunk(ctx.world_size)[ctx.rank].to(ctx.device)
        model = build_plain_model(cfg, ctx, data, channels_last=False)
        make_strategy(cfg, ctx).wrap(model)(mine)
        plain_cfg = replace(cfg, model=replace(cfg.model, sync_bn=False))
        whole, local = (build_plain_model(plain_cfg, ctx, data, False) for _ in range(2))
        whole(x.to(ctx.device))
        local(mine)

        def stats(m: torch.nn.Module) -> list[torch.Tensor]:
            return [v.detach().float().cpu() for k, v in m.state_dict().items()
                    if "running_" in k]

        def gap(a: torch.nn.Module, b: torch.nn.Module) -> float:
            return max(float((s - t).abs().max()) for s, t in zip(stats(a), stats(b),
                                                                  strict=True))

        return {"sync_layers": sum(isinstance(m, torch.nn.SyncBatchNorm)
                                   for m in model.modules()),
                "synced_vs_global": gap(model, whole), "local_vs_global": gap(local, whole)}
    finally:
        dist.teardown(ctx)


def train_and_return_state(overrides: list[str]) -> dict:
    """Train through the production entry point; return the main worker's last checkpoint
    without its per-rank parts (model, optimizer, scheduler, EMA, position)."""
    cfg = load_config(DEFAULT_CONFIG, overrides)
    ctx = dist.setup(cfg.dist)
    try:
        train(cfg, ctx)
    finally:
        dist.teardown(ctx)
    if not ctx.is_main:
        return {}
    state = torch.load(Path(cfg.run.dir) / "checkpoints" / "last.pt", weights_only=True)
    return {k: v for k, v in state.items() if k not in ("ranks", "config")}


def fatal_dump_file() -> tuple[str, bool]:
    """Arm the stack dump as every worker does; its file's path and whether it exists now."""
    from train.run.hang import enable_fatal_dump, fatal_dump_path

    enable_fatal_dump()
    path = fatal_dump_path(os.getpid(), 0)
    return str(path), path.is_file()


def worker_main(argv: list[str]) -> tuple[int, str, str]:
    """What `python -m train ARGV` does as one of torchrun's workers, in this process: the
    stop-signal handlers it installs first, then its `main` (train/__main__.py); its exit code
    and what it printed (stdout, stderr). The process leaves through the harness, not through
    `leave`."""
    import train.__main__ as entry
    from common.signals import stop_signals

    stop_signals(entry._say_startup)
    with _printed() as (out, err):
        code = entry.main(argv)
    return code, out.read().decode(), err.read().decode()


@contextlib.contextmanager
def _printed() -> Iterator[tuple]:
    """File descriptors 1 and 2 into two files, rewound for reading after the block: what
    print, the logging handlers and torch's C++ side write."""
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    try:
        yield out, err
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, was in zip((1, 2), saved, strict=True):
            os.dup2(was, fd)
            os.close(was)
        out.seek(0)
        err.seek(0)
