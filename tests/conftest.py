"""Every test runs with the GPUs hidden, and so does every process it starts.

The tests that are not marked `gpu` are the CPU twins: without this, `dist.device=auto` would
pick CUDA on a GPU machine and e.g. refuse 2 workers on a 1-GPU box. Tests marked `gpu` give
their subprocesses the GPUs back with `tests.helpers.gpu_env()`. pytest imports this file
before any test module, so before anything can start CUDA.
"""

from tests.helpers import hide_gpus

hide_gpus()
