"""This process's random generators as a checkpointed part: tensors and plain values only, so
that checkpoints load with `weights_only=True`. Host-side state: it never goes through a GPU."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


class ProcessRng:
    """torch (CPU and, once started, CUDA), numpy and Python's `random`, per rank."""

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": numpy_state(),
            "python": _python_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"].cpu())
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"].cpu())
        set_numpy_state(state["numpy"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal.tolist()), gauss))


def numpy_state(generator: Any = np.random) -> list[Any]:
    """A numpy RandomState's state as tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = generator.get_state()
    return [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def set_numpy_state(state: list[Any], generator: Any = np.random) -> None:
    kind, keys, pos, has_gauss, cached = state
    generator.set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))


def _python_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, torch.tensor(internal, dtype=torch.int64), gauss]
