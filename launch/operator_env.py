"""The node layout a Kubernetes operator injects into each pod, as the launcher's defaults, so
that a manifest runs `python -m launch CONFIG` with no shell glue (docs/kubernetes.md).

- Kubeflow Trainer v2 (TrainJob, torch runtime): `PET_NNODES`, `PET_NPROC_PER_NODE`,
  `PET_NODE_RANK`, `PET_MASTER_ADDR`, `PET_MASTER_PORT` (torchrun's own `PET_*` defaults).
- Kubeflow PyTorchJob v1: `MASTER_ADDR`, `MASTER_PORT`, `WORLD_SIZE` = the number of pods
  (Master + Workers) and `RANK` = this pod's index (Master 0, Worker i is i + 1): one launcher
  per pod, so these are the node count and the node rank, not worker ranks
  (training-operator, pkg/controller.v1/pytorch/envvar.go, setPodEnv).

A flag on the command line wins over the environment. The v1 names are generic: they count
only when all four are set and `LOCAL_RANK` is not (a process that torchrun started has it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping

from common.errors import EXIT_USER_ERROR

# The launcher's flag (argparse dest) for each variable, in the order that says which wins.
TRAINER_V2 = {"nnodes": "PET_NNODES", "gpus": "PET_NPROC_PER_NODE", "node_rank": "PET_NODE_RANK",
              "master_addr": "PET_MASTER_ADDR", "master_port": "PET_MASTER_PORT"}
PYTORCHJOB_V1 = {"nnodes": "WORLD_SIZE", "node_rank": "RANK", "master_addr": "MASTER_ADDR",
                 "master_port": "MASTER_PORT"}
DEFAULTS = {"nnodes": "1", "gpus": None, "node_rank": 0, "master_addr": None,
            "master_port": None}
CONVERT = {"nnodes": str, "gpus": int, "node_rank": int, "master_addr": str, "master_port": int}


def operator_values(environ: Mapping[str, str]) -> tuple[str, dict[str, object]]:
    """(which operator, {flag: value}) from the environment; ("", {}) when none is there.
    PET_* first; a PyTorchJob may set some of them too (PET_NPROC_PER_NODE, with nprocPerNode),
    and its WORLD_SIZE, RANK, MASTER_* fill the rest."""
    found = {flag: environ[name] for flag, name in TRAINER_V2.items() if environ.get(name)}
    # `auto`, `cpu`, `gpu` (numProcPerNode words of some versions): our own default count.
    if not found.get("gpus", "0").isdigit():
        found.pop("gpus")
    source = "Kubeflow Trainer (PET_*)" if found else ""
    if all(environ.get(name) for name in PYTORCHJOB_V1.values()) and "LOCAL_RANK" not in environ:
        source = "PyTorchJob (WORLD_SIZE, RANK)"
        found = {**{flag: environ[name] for flag, name in PYTORCHJOB_V1.items()}, **found}
    return source, found


def apply_operator_env(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    """Fill the node flags not given on the command line (None) from the operator's
    variables, else from the defaults; what was taken, for the console ("" when nothing)."""
    source, values = operator_values(environ)
    taken = []
    for flag, default in DEFAULTS.items():
        if getattr(args, flag) is not None:
            continue
        if flag in values:
            try:
                setattr(args, flag, CONVERT[flag](values[flag]))
            except ValueError:
                print(f"error: {source}: {flag.replace('_', '-')} {values[flag]!r} is not a "
                      f"whole number", file=sys.stderr)
                raise SystemExit(EXIT_USER_ERROR) from None
            taken.append(f"{flag.replace('_', '-')} {values[flag]}")
        else:
            setattr(args, flag, default)
    return f"from the {source} environment: {', '.join(taken)}" if taken else ""
