"""ZeRO (`ddp.zero`) under fp16's GradScaler, with 2 gloo workers: the scaler's protocol passes
through to torch's fused optimizer (no host sync per step: the skip decision stays on the
device), every rank skips the same overflowing step, and the parameters are those of a plain
optimizer, bitwise, with and without flat buckets (one broadcast per rank, or per parameter);
when the buckets are used."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import run_distributed
from tests.strategy_workers import zero_under_a_grad_scaler

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("bucket_view, broadcasts", [(True, 2), (False, 4)])
def test_zero_steps_under_a_grad_scaler_without_a_host_sync_and_as_a_plain_optimizer(
        bucket_view, broadcasts):
    zero = run_distributed(zero_under_a_grad_scaler, 2, bucket_view)
    plain = run_distributed(zero_under_a_grad_scaler, 2, None)
    for rank in range(2):
        assert zero[rank]["supports"] and zero[rank]["host_syncing_steps"] == 0
        assert plain[rank]["host_syncing_steps"] == 0  # fused SGD alone: the reference
        for step, (mine, reference) in enumerate(zip(zero[rank]["params"],
                                                     plain[rank]["params"], strict=True)):
            for a, b in zip(mine, reference, strict=True):
                assert torch.equal(a, b), (rank, step)
        steps = zero[rank]["params"]
        assert all(torch.equal(a, b) for a, b in zip(steps[1], steps[2], strict=True))  # skipped
        assert not torch.equal(steps[2][0], steps[3][0])  # and on after it
        scales = zero[rank]["scales"]
        assert scales[2] == scales[1] / 2 == plain[rank]["scales"][2]
        # Flat buckets: one per rank, broadcast by its owner; else one per parameter (4 here).
        assert zero[rank]["broadcasts"] == [broadcasts] * 4


def test_flat_buckets_on_gpus_only_and_never_for_channels_last_weights():
    from torch import nn

    from train.strategies.zero import flat_buckets_fit

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(4, 2))
    groups = [{"params": [net[0].weight, net[1].weight]}, {"params": [net[0].bias]}]
    assert flat_buckets_fit(groups, "cuda") and flat_buckets_fit(list(net.parameters()), "cuda")
    assert not flat_buckets_fit(list(net.parameters()), "cpu")  # gloo: measured slower
    net[0].to(memory_format=torch.channels_last)
    assert not flat_buckets_fit(list(net.parameters()), "cuda")
