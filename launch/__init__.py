"""The launcher: `python -m launch [--gpus N] [--cpu] ... CONFIG [key=value ...]`."""
