"""ZeRO stage 1 for mode ddp (`ddp.zero`): torch's ZeroRedundancyOptimizer, made to take the
GradScaler's fp16 protocol from its local optimizer.

Each rank keeps the optimizer state of its share of the parameters (whole tensors, balanced by
size), steps them after DDP's allreduce, and broadcasts them to the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

# What GradScaler.step hands an optimizer that supports its protocol, as attributes.
SCALER_ATTRIBUTES = ("grad_scale", "found_inf")


def flat_buckets_fit(params: list[nn.Parameter] | list[dict[str, Any]], device_type: str
                     ) -> bool:
    """Whether ZeRO keeps each rank's parameters in one flat bucket: one broadcast per rank
    after a step instead of one per parameter. On GPUs, yes: each NCCL broadcast is a launch
    and a collective's latency (ResNet-50: 161 of them per step). On the CPU, no: with gloo the
    per-parameter broadcasts measured faster (tools/bench/zero_sync.py; the performance page).
    And not with channels_last weights: the bucket holds each parameter as a contiguous view,
    so their layout would change under DDP, whose gradient buckets keep the old one, and the
    convolutions would compute other bits than without ZeRO."""
    groups = [g["params"] if isinstance(g, dict) else [g] for g in params]  # or param groups
    return device_type == "cuda" and all(p.is_contiguous() for group in groups for p in group)


class ZeroOptimizer(ZeroRedundancyOptimizer):
    """ZeroRedundancyOptimizer, each rank's parameters in one flat bucket or not (`bucket_view`:
    `flat_buckets_fit`), that passes the GradScaler's scale and
    found-inf flag on to a local optimizer that takes them (torch's fused SGD and AdamW).

    Without that, GradScaler reads every step's found-inf flag back to the host (a sync per
    step on a GPU) to decide whether to step. With it, the fused kernels unscale their
    gradients and skip the update on an inf/NaN on the device. The flag covers every
    parameter's gradient (the scaler checks all of `param_groups`, the whole model), and DDP
    gave every rank the same gradients: every rank skips the same steps. The parameters of
    other ranks' shares keep scaled gradients, which nothing reads: the broadcast overwrites
    those parameters."""

    def __init__(self, params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
                 optimizer_class: type, bucket_view: bool, **defaults: Any):
        super().__init__(params, optimizer_class=optimizer_class,
                         parameters_as_bucket_view=bucket_view, **defaults)
        self._step_supports_amp_scaling = getattr(self.optim, "_step_supports_amp_scaling",
                                                  False)

    def step(self, closure: Callable[[], float] | None = None, **kwargs: Any) -> float | None:
        given = [name for name in SCALER_ATTRIBUTES if hasattr(self, name)]
        for name in given:
            setattr(self.optim, name, getattr(self, name))
        try:
            return super().step(closure, **kwargs)
        finally:
            for name in given:
                delattr(self.optim, name)
