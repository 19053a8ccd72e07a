"""`python -m train.after.evaluate RUN [--checkpoint FILE] [--workers N] [--ema] [key=value ...]`
(`make eval`): a run's checkpoint on the test split, in N gloo/NCCL workers.

Loads the run's config.yaml (overrides change the data: another root, another batch size),
the checkpoint with weights_only, and evaluates exactly as training does at an epoch's end;
writes eval.json (loss, top-1, top-5, per-class accuracy, the confusion matrix) and
confusion.png into the run folder, and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from common.errors import UserError, outside
from common.files import atomic_write
from common.host import leave
from common.spawn import SpawnError, spawn
from train import dist
from train.after.loaded import check_inputs, checkpoint_path, open_trained, run_config
from train.loop.evaluation import evaluate

log = logging.getLogger("train.after.evaluate")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.after.evaluate", description=__doc__)
    parser.add_argument("run", type=Path, help="the run folder (holds config.yaml)")
    parser.add_argument("--checkpoint", help="last (RUN/checkpoints/last.pt, the default), "
                        "best (checkpoint.keep_best's best.pt) or a checkpoint file")
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    parser.add_argument("--ema", action="store_true", help="the weights' moving average")
    parser.add_argument("--cpu", action="store_true", help="evaluate on CPU workers")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    # intermixed: `make eval` puts ARGS' overrides after the options it adds
    return parser.parse_intermixed_args(argv)


def evaluate_worker(run: str, checkpoint: str, ema: bool, overrides: list[str]) -> dict:
    """One worker: the run's data and model, the checkpoint's weights, the test split."""
    cfg = run_config(Path(run), overrides)
    ctx = dist.setup(cfg.dist)
    try:
        trained = dist.agree(ctx, lambda: open_trained(cfg, ctx, Path(checkpoint), ema,
                                                       Path(run)))
        result = evaluate(trained.model, trained.data.test.iterate(), ctx, trained.autocast,
                          num_classes=trained.data.facts.num_classes)
    except UserError as exc:  # agreed: every rank returns it, the command prints it once
        return {"error": str(exc), "exit_code": exc.exit_code}
    finally:
        dist.teardown(ctx)
    return {**result, "classes": trained.data.facts.classes, "step": trained.step,
            "world_size": ctx.world_size} if ctx.is_main else {}


def report(result: dict[str, Any], run: Path, checkpoint: Path, ema: bool) -> dict[str, Any]:
    """eval.json's content: what was evaluated (resolved: `runs/latest` and `last.pt` move on),
    per-class accuracy from the confusion matrix's rows."""
    from train.after.loaded import checkpoint_record

    confusion = result["confusion"]
    per_class = (confusion.diag().double() / confusion.sum(1).clamp_min(1)).tolist()
    return {**checkpoint_record(run, checkpoint, result["step"]), "weights": "ema" if ema
            else "model", "workers": result["world_size"], "samples": int(result["samples"]),
            "loss": result["loss"], "top1_accuracy": result["accuracy"],
            "top5_accuracy": result["top5_accuracy"],
            "per_class_accuracy": dict(zip(result["classes"], per_class, strict=True)),
            "confusion": confusion.tolist()}


def confusion_figure(summary: dict[str, Any]) -> Any:
    """The confusion matrix as counts: colour for the eye, a colour bar for its scale, and
    each cell's count written in it where the cells are big enough to hold one."""
    from matplotlib.figure import Figure  # no pyplot: no display, no global figure registry

    names, confusion = list(summary["per_class_accuracy"]), summary["confusion"]
    side = min(12, 3.5 + 0.45 * len(names))
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.subplots()
    image = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(image, ax=ax, label="test samples", fraction=0.046, pad=0.04)
    if len(names) <= 40:  # beyond that, names would overlap
        ax.set_xticks(range(len(names)), names, rotation=90)
        ax.set_yticks(range(len(names)), names)
    if len(names) <= 20:  # beyond that, the numbers would not fit their cells
        high = max(max(row) for row in confusion) or 1
        for i, row in enumerate(confusion):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                        color="white" if count > high / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{summary['weights']} at step {summary['step']}: top-1 "
                 f"{summary['top1_accuracy']:.2%} of {summary['samples']:,}")
    fig.tight_layout()
    return fig


def plot_confusion(summary: dict[str, Any], path: Path) -> None:
    fig = confusion_figure(summary)
    atomic_write(path, lambda p: fig.savefig(p, dpi=100, format="png"))


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    overrides = [*args.overrides, *(["dist.device=cpu"] if args.cpu else []),
                 "wandb.mode=disabled"]
    try:
        checkpoint = checkpoint_path(args.run, args.checkpoint)
        if args.workers < 1:
            raise UserError(f"--workers must be at least 1; got {args.workers}")

        check_inputs(args.run, checkpoint, overrides)
        result = spawn(evaluate_worker, args.workers, str(args.run), str(checkpoint), args.ema,
                       overrides, timeout=7 * 24 * 3600.0, launched=args.workers > 1)[0]
        if "error" in result:  # the workers' agreed one line
            print(f"error: {result['error']}", file=sys.stderr)
            return result["exit_code"]
        summary = report(result, args.run, checkpoint, args.ema)
        with outside(f"writing eval.json and confusion.png into {args.run}"):
            atomic_write(args.run / "eval.json",
                         lambda p: p.write_text(json.dumps(summary, indent=1)))
            plot_confusion(summary, args.run / "confusion.png")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except SpawnError as exc:  # a worker's own failure (a bug): its traceback is the report
        raise SystemExit(f"error: a worker of the evaluation failed:\n{exc}") from None
    print(f"{summary['weights']} of {checkpoint} (step {summary['step']}) on "
          f"{summary['samples']:,} test samples, {summary['workers']} worker(s): loss "
          f"{summary['loss']:.4f}  top-1 {summary['top1_accuracy']:.2%}  top-5 "
          f"{summary['top5_accuracy']:.2%}\nwrote {args.run / 'eval.json'} and "
          f"{args.run / 'confusion.png'}")
    return 0


if __name__ == "__main__":
    leave(main())  # without the interpreter's teardown (common/host.py)
