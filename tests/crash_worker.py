"""A worker that fails on purpose: rank 1 exits with the code given, the others wait."""

import os
import signal
import sys
import time

if __name__ == "__main__":
    # Started with the stop signals blocked (common/signals.py: held_for_children) like every
    # worker: ours unblock them once their handlers exist; this one at once, so that torchrun's
    # SIGTERM ends it instead of its 30 s wait before SIGKILL.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
    if os.environ["RANK"] == "1":
        sys.exit(int(sys.argv[1]))
    time.sleep(60)  # torchrun must stop this one when rank 1 fails
