"""`python -m train.after.export RUN [--checkpoint FILE] [--ema] [--out DIR] [key=value ...]`
(`make export`): a run's model for use outside this project.

Writes into DIR (default RUN/export): model.pt (the plain state_dict, loadable with
weights_only into the model `model.name` builds), model.pt2 (a `torch.export` program taking a
batch of normalized images, where the model can be exported), and meta.json (the model name,
input shape, class names and the normalization the inputs need).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import torch

from common.errors import UserError, outside
from common.files import atomic_write
from common.host import leave
from train import dist
from train.after.loaded import (
    checkpoint_path,
    checkpoint_record,
    normalization,
    open_trained,
    run_config,
)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.after.export", description=__doc__)
    parser.add_argument("run", type=Path, help="the run folder (holds config.yaml)")
    parser.add_argument("--checkpoint", help="last (RUN/checkpoints/last.pt, the default), "
                        "best (checkpoint.keep_best's best.pt) or a checkpoint file")
    parser.add_argument("--ema", action="store_true", help="the weights' moving average")
    parser.add_argument("--out", type=Path, help="default: RUN/export")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    # intermixed: `make export` puts ARGS' overrides after the options it adds
    return parser.parse_intermixed_args(argv)


def export_program(model: torch.nn.Module, example: torch.Tensor, path: Path) -> str:
    """model.pt2 when torch.export can trace the model; what stopped it otherwise."""
    try:
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        buffer = io.BytesIO()  # torch.export.save wants a .pt2 name; the temp file has none
        torch.export.save(program, buffer)
        atomic_write(path, lambda p: p.write_bytes(buffer.getvalue()))
    except Exception as exc:  # noqa: BLE001 - any tracing failure: the state_dict still stands
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return f"not exported ({type(exc).__name__}: {first})"
    return path.name


def export(run: Path, checkpoint: Path, ema: bool, out: Path, overrides: list[str]) -> dict:
    cfg = run_config(run, [*overrides, "dist.device=cpu", "wandb.mode=disabled",
                           "perf.channels_last=false"])
    ctx = dist.setup(cfg.dist)
    try:
        trained = open_trained(cfg, ctx, checkpoint, ema, run)
    finally:
        dist.teardown(ctx)
    facts = trained.data.facts
    state = trained.model.state_dict()
    example = torch.zeros(2, facts.channels, facts.image_size, facts.image_size)
    with outside(f"writing the export into {out}"):  # the user's folder: a file, a full disk
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "model.pt", lambda p: torch.save(state, p))
        program = export_program(trained.model, example, out / "model.pt2")
        meta = {"model": cfg.model.name, **checkpoint_record(run, checkpoint, trained.step),
                "weights": "ema" if ema else "model",
                "input": [facts.channels, facts.image_size, facts.image_size],
                "classes": facts.classes, "normalization": normalization(trained.data),
                "state_dict": "model.pt", "program": program}
        atomic_write(out / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=1)))
    return meta


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    out = args.out or args.run / "export"
    try:
        meta = export(args.run, checkpoint_path(args.run, args.checkpoint), args.ema, out,
                      args.overrides)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"wrote {out / 'model.pt'} ({meta['model']}, step {meta['step']}), "
          f"torch.export program: {meta['program']}, {out / 'meta.json'}")
    return 0


if __name__ == "__main__":
    leave(main())  # without the interpreter's teardown (common/host.py)
