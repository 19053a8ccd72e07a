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
the worker still needs batches to reach the step where it checkpoints. The server ends when
the worker does (its pipe from the worker closes), and so do the loader processes (torch's
watchdog sees their parent gone).
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import signal
import sys
import warnings
from collections.abc import Iterator
from multiprocessing.context import BaseContext
from typing import Any

from torch.utils.data import DataLoader

from common.errors import UserError

# The server imports these once; each loader process then unpickles its dataset without
# importing torch or the data modules again.
PRELOAD = ["train.data.loader_server", "torch", "train.data.stream"]


def loader_context() -> BaseContext:
    """The start method of every loader process (DataLoader's `multiprocessing_context`)."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def start_loader(loader: DataLoader) -> Iterator[Any]:
    """`iter(loader)`; a dataset that cannot be pickled to the loader processes is one line."""
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


def _in_the_server() -> bool:
    """This interpreter is a forkserver (`python -c 'from multiprocessing.forkserver import
    main; ...'`) importing its preload list."""
    return sys.argv[:1] == ["-c"] and "multiprocessing.forkserver" in sys.modules


if _in_the_server():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
