"""A worker that fails on purpose: rank 1 exits with the code given, the others wait."""

import os
import sys
import time

if __name__ == "__main__":
    if os.environ["RANK"] == "1":
        sys.exit(int(sys.argv[1]))
    time.sleep(60)  # torchrun must stop this one when rank 1 fails
