"""Where loader processes start: forked by a forkserver, not by the training worker itself.

A training worker runs threads (gloo's, the stop-signal watcher, the run lock's renewal,
multiprocessing's queue feeders). A fork while one of them holds CPython's runtime lock leaves
the child stuck before its first line on Python before 3.12 (CPython gh-112275: here an
evaluation waited forever for a loader process stuck in PyOS_AfterFork_Child, twice in the
suite's runs). A forkserver is single-threaded: it is started once per worker (a clean
interpreter that imports `PRELOAD`) and forks the loader processes. Python 3.14 makes it the
default start method for the same reason.

The server imports this module first (its preload) and then ignores SIGTERM; SIGINT it ignores
by itself. The loader processes it forks ignore both too (train/data/stream.py:
`_quiet_loader_process`): a stop signal sent to the whole process group must not end them while
the worker still needs batches to reach the step where it checkpoints.

So nothing but the worker's end may end them. multiprocessing's server would wait for its
children, and they (each holding the server's pipe, with the server as their parent) for it:
after a worker that left at once (a failure, a stop, SIGKILL) both would live on, holding
torch in memory and the worker's output pipes. Here the server gets SIGKILL when the worker
ends, and each loader process when the server does (the parent-death signal).

multiprocessing's resource tracker, one process per worker beside the server, unlinks the
named semaphores of the loader queues that such a worker left, and would then warn "There
appear to be N leaked semaphore objects" on the worker's stderr, after the one line of its
error. It starts here with that warning ignored; the cleanup is the same.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import pickle
import signal
import sys
import warnings
from collections.abc import Iterator
from multiprocessing import resource_tracker
from multiprocessing.context import BaseContext
from typing import Any

from common.host import die_with_parent, in_forkserver, pause_collector, resume_collector

if in_forkserver():  # the server, importing PRELOAD: torch with the collector paused
    pause_collector()

from torch.utils.data import DataLoader  # noqa: E402

from common.errors import UserError  # noqa: E402

# The server imports these once; each loader process then unpickles its dataset without
# importing torch or the data modules again.
PRELOAD = ["train.data.loader_server", "torch", "train.data.stream"]
# The resource tracker's warnings are about leaks it is cleaning up (see above).
TRACKER_QUIET = "ignore::UserWarning:multiprocessing.resource_tracker"


def loader_context() -> BaseContext:
    """The start method of every loader process (DataLoader's `multiprocessing_context`)."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def start_loader(loader: DataLoader) -> Iterator[Any]:
    """`iter(loader)`; a dataset that cannot be pickled to the loader processes is one line.
    Call it from the worker's main thread: the first call starts the server (see
    `die_with_parent`)."""
    if loader.num_workers:
        _start_quiet_tracker()
    try:
        with warnings.catch_warnings():  # torch's own warning before the error: said below
            warnings.filterwarnings("ignore", message="Got pickle error")
            return iter(loader)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        if loader.num_workers == 0:
            raise
        raise UserError(f"the dataset cannot be sent to its loader processes "
                        f"({type(exc).__name__}: {exc}); make it picklable (no lambdas or "
                        f"open files as attributes) or set data.num_workers=0") from None


def _start_quiet_tracker() -> None:
    """Start the resource tracker, unless it runs, with its leak warnings ignored: it is
    started with this interpreter's -W options (multiprocessing.util's
    `_args_from_interpreter_flags`), and the server reuses it."""
    sys.warnoptions.append(TRACKER_QUIET)
    try:
        resource_tracker.ensure_running()
    finally:
        sys.warnoptions.remove(TRACKER_QUIET)


if in_forkserver():
    # What torch made stays out of the collector's view, in the server and in every loader
    # process it forks (common/host.py).
    resume_collector()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(death=signal.SIGKILL)  # the worker (before this, its pipe's end stops it)
    os.register_at_fork(after_in_child=functools.partial(die_with_parent, os.getpid(),
                                                         signal.SIGKILL))
