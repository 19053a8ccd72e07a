"""ZeRO (`ddp.zero`) under fp16's GradScaler, with 2 gloo workers: the scaler's protocol passes
through to torch's fused optimizer (no host sync per step: the skip decision stays on the
device), every rank skips the same overflowing step, and the parameters are those of a plain
optimizer, bitwise; after a step each rank broadcasts its bucket, not each parameter."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import run_distributed
from tests.strategy_workers import zero_under_a_grad_scaler

pytestmark = pytest.mark.slow


def test_zero_steps_under_a_grad_scaler_without_a_host_sync_and_as_a_plain_optimizer():
    zero = run_distributed(zero_under_a_grad_scaler, 2, True)
    plain = run_distributed(zero_under_a_grad_scaler, 2, False)
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
        # One bucket per rank, broadcast by its owner: 2 per step (4 parameters here).
        assert zero[rank]["broadcasts"] == [2] * 4
