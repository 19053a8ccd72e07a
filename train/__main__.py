"""`python -m train CONFIG [key=value ...]`: one worker; torchrun starts one per device.

argv -> config -> distributed setup -> worker (train/worker.py) -> exit code and one line.
"""

from __future__ import annotations

import os
import sys

from common import status
from common.host import die_with_parent, leave, pause_collector, resume_collector
from common.signals import startup_line, stop_signals
from common.torch_support import refuse_unsupported_torch


def _say_startup(signum: int) -> None:
    """A stop signal before training: the launcher, when there is one, says it; else rank 0.
    A worker whose launcher is already gone stays silent too: the launcher said the line and
    left before this worker got its signal (it was still starting, so torchrun's agent did not
    wait for it), or it was killed and the user knows why."""
    if not status.started_by_launcher() and os.environ.get("RANK", "0") == "0":
        print(startup_line(signum), file=sys.stderr, flush=True)


if __name__ == "__main__":
    # First, before anything slow: a stop signal during start-up exits at once (130, quietly),
    # and a worker whose launcher dies gets SIGTERM instead of living on as an orphan.
    stop_signals(_say_startup)
    pause_collector()  # until the imports below are done (common/host.py)
    if "RANK" in os.environ:
        die_with_parent(int(os.environ.get(status.PARENT_ENV, "0")) or None)
    # Started by torchrun directly, not by the launcher: a torch older than the supported
    # minimum is one line from local rank 0 and exit 2, before the imports that may fail on it.
    refuse_unsupported_torch()

import argparse  # noqa: E402 - after the signal handlers
import logging  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from common.config import load_config  # noqa: E402
from common.errors import EXIT_INTERRUPTED, UserError  # noqa: E402
from common.signals import signal_name  # noqa: E402
from train import dist  # noqa: E402
from train.dist import DistContext  # noqa: E402
from train.loop.trainer import Interrupted  # noqa: E402
from train.observe.logs import setup_logging  # noqa: E402
from train.worker import train  # noqa: E402

if __name__ == "__main__":
    # DDP's constructor and every optimizer import torch._dynamo (0.9 s of CPU here): here,
    # with the imports, rather than halfway through building the model.
    import torch._dynamo  # noqa: E402, F401

    resume_collector()

log = logging.getLogger("train")
REPORT_GRACE_S = 3.0  # other local ranks wait this long for local rank 0 to report


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    setup_logging(int(os.environ.get("RANK", "0")))
    ctx = None
    try:
        cfg = load_config(args.config, args.overrides)
        ctx = dist.setup(cfg.dist)
        train(cfg, ctx)
        return 0
    except Interrupted as exc:
        status.report(stopped_at=exc.step)
        if not status.launcher_reports():
            log.info("interrupted by %s: stopped after step %d and wrote a checkpoint; run the "
                     "same command to resume", signal_name(exc.signum), exc.step)
        return EXIT_INTERRUPTED
    except UserError as exc:
        if not exc.agreed and not getattr(exc, "quiet", False):
            dist.publish_failure(ctx, str(exc), exc.exit_code)  # before the others notice
        report(exc, ctx)
        stop_signals().leaving(exc.exit_code)  # said: a SIGTERM from now on keeps the code
        if exc.agreed:
            # Exit after the reporting rank has printed: torchrun stops everyone at the
            # first exit, and the message would be lost.
            torch.distributed.barrier()
        elif ctx is None and int(os.environ.get("LOCAL_RANK", "0")) > 0:
            # Before the process group exists (a config error) there is no barrier: the
            # others give local rank 0 the moment it needs to print the one line.
            time.sleep(REPORT_GRACE_S)
        return exc.exit_code
    finally:
        dist.teardown(ctx)


def report(exc: UserError, ctx: DistContext | None) -> None:
    """Errors every rank shares (config before setup, agreed ones) come from local rank 0 of
    each node; an error of one rank alone comes from that rank, which it names."""
    shared = ctx is None or exc.agreed or not ctx.distributed
    if getattr(exc, "quiet", False):
        return
    if not shared:
        print(f"error: [rank {ctx.rank}] {exc}", file=sys.stderr, flush=True)
    elif int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"error: {exc}", file=sys.stderr, flush=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train",
                                     description="One training worker (start it with torchrun "
                                                 "or `python -m launch`).")
    parser.add_argument("config", help="YAML config file, e.g. configs/default.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.epochs=3 optim.lr=0.1")
    return parser.parse_args(argv)


if __name__ == "__main__":
    code = main()
    # A failure leaves at once: every rank leaves together, and torchrun sends SIGTERM to those
    # still leaving once the first has gone; exit functions or the interpreter's shutdown
    # would let that signal end the process (-15) instead of with its code.
    leave(code, exit_functions=code == 0)
