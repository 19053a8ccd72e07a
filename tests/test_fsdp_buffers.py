"""mode fsdp keeps the buffers (BatchNorm statistics) of every rank equal with one coalesced
broadcast per optimizer step, whatever the number of buffers and micro-batches (2 gloo
workers, torch.distributed.broadcast counted around the real call)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import run_distributed
from tests.strategy_workers import fsdp_buffer_broadcasts

pytestmark = pytest.mark.slow


def test_fsdp_broadcasts_its_buffers_once_per_step_and_ranks_agree(tmp_path):
    accum = 2  # two forwards per step: still one broadcast
    overrides = ["mode=fsdp", "model.name=resnet18", "train.batch_size=8",
                 f"train.grad_accum_steps={accum}", "wandb.mode=disabled",
                 "data.synthetic.train_samples=64", "data.synthetic.test_samples=16",
                 f"run.dir={tmp_path}"]
    ranks = run_distributed(fsdp_buffer_broadcasts, 2, overrides, 3)
    buffers = [rank["buffers"] for rank in ranks]
    assert len(buffers[0]) > 30  # ResNet-18: 3 per BatchNorm, 20 BatchNorms
    assert [rank["per_step"] for rank in ranks] == [[1, 1, 1]] * 2
    for name, value in buffers[0].items():
        assert torch.equal(buffers[1][name], value), name
    # The ranks saw different data: equal because synchronized, not because untouched.
    means = [v for k, v in buffers[0].items() if k.endswith("running_mean")]
    assert all(m.abs().sum() > 0 for m in means)
    assert all(int(v) == 3 * accum for k, v in buffers[0].items()
               if k.endswith("num_batches_tracked"))
