"""DDP's PowerSGD hook with a state that survives checkpoints and DDP's bucket rebuilds.

PowerSGD keeps, per bucket, the local compression error (added to the next step's gradients)
and the low-rank factors P and Q (Q is reused as the next step's starting point), all laid
out in the order of the bucket's parameters. DDP builds its buckets in the order of
`model.parameters()`, then rebuilds them once in the order gradients became ready: a state
saved from a run that has rebuilt its buckets does not fit a freshly started DDP, and a state
carried across a rebuild lands on the wrong parameters. So the state is kept per parameter
whenever the layout changes, and saved per parameter.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

from train.loop.rng import numpy_state, set_numpy_state

Pieces = dict[str, dict[int, torch.Tensor]]  # "error"/"p"/"q" -> parameter index -> slice


class PowerSGD:
    def __init__(self, model: nn.Module, rank: int, start_step: int):
        self.state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=rank,
                                        start_powerSGD_iter=start_step)
        self.params = list(model.parameters())
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.layouts: dict[int, tuple[int, ...]] = {}  # bucket index -> parameter indices
        self.pieces: Pieces | None = None  # per-parameter state waiting for its bucket

    def hook(self, state, bucket):  # no annotations: DDP checks them against its own types
        order = tuple(self.index[id(p)] for p in bucket.parameters())
        if self.pieces is not None or self.layouts.get(bucket.index()) != order:
            self._relayout(bucket.index(), order)
        return psgd.powerSGD_hook(state, bucket)

    def state_dict(self) -> dict[str, Any]:
        pieces = self.pieces if self.pieces is not None else self._split_all()
        return {"iter": self.state.iter, "rng": numpy_state(self.state.rng), **pieces}

    def load_state_dict(self, saved: dict[str, Any], device: torch.device) -> None:
        self.state.iter = saved["iter"]
        set_numpy_state(saved["rng"], self.state.rng)
        self.pieces = {kind: {i: t.to(device) for i, t in saved[kind].items()}
                       for kind in ("error", "p", "q")}
        self.layouts.clear()
        self._clear_buckets()

    # --- layouts ----------------------------------------------------------------------------

    def _relayout(self, bucket: int, order: tuple[int, ...]) -> None:
        """Give `bucket` its state in the parameter order `order` (before the hook runs)."""
        if self.pieces is None:
            self.pieces = self._split_all()
            self._clear_buckets()
        self.layouts[bucket] = order
        for kind, memory in (("error", self.state.error_dict), ("p", self.state.p_memory_dict),
                             ("q", self.state.q_memory_dict)):
            wanted = [i for i, _ in self._slices(order, kind)]
            if wanted and all(i in self.pieces[kind] for i in wanted):
                memory[bucket] = torch.cat([self.pieces[kind].pop(i) for i in wanted])
            for i in order:  # a part without the rest cannot be placed: start it afresh
                self.pieces[kind].pop(i, None)
        if not any(self.pieces.values()):
            self.pieces = None

    def _split_all(self) -> Pieces:
        """Every bucket's state cut into per-parameter slices, by the layouts it was made in."""
        pieces: Pieces = {"error": {}, "p": {}, "q": {}}
        for kind, memory in (("error", self.state.error_dict), ("p", self.state.p_memory_dict),
                             ("q", self.state.q_memory_dict)):
            for bucket, flat in memory.items():
                offset = 0
                for i, size in self._slices(self.layouts[bucket], kind):
                    pieces[kind][i] = flat[offset:offset + size].clone()
                    offset += size
        return pieces

    def _clear_buckets(self) -> None:
        for memory in (self.state.error_dict, self.state.p_memory_dict, self.state.q_memory_dict):
            memory.clear()

    def _slices(self, order: tuple[int, ...], kind: str) -> Iterator[tuple[int, int]]:
        """(parameter index, length) in the order `powerSGD_hook` lays out `kind`: the error
        follows the bucket; P and Q cover compressed matrices only, grouped by shape."""
        if kind == "error":
            yield from ((i, self.params[i].numel()) for i in order)
            return
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i in order:
            n = self.params[i].shape[0]
            m = self.params[i].numel() // n
            rank = min(n, m, self.state.matrix_approximation_rank)
            if psgd._should_compress(n, m, rank, self.state.min_compression_rate)[0]:
                groups.setdefault((n, m), []).append((i, (n if kind == "p" else m) * rank))
        for members in groups.values():
            yield from members
