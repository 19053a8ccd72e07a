"""The recipe under fp16 on GPUs: clipping after the GradScaler's unscale, the same on 2 DDP
GPUs as on one (CPU twins: tests/test_recipes.py for the paths, tests/test_optim.py's
test_under_fp16_the_norm_is_taken_after_unscaling for the unscale)."""

import pytest
import torch

from tests.helpers import gpu_count, run_distributed, run_single
from tests.test_gpu import fp32_gpu_env
from tests.test_recipes import RECIPE
from tests.workers import train_and_return_state

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
FP16 = [*RECIPE, "dist.device=cuda", "perf.cudnn_benchmark=false", "perf.precision=fp16"]


@pytest.mark.skipif(gpu_count() < 2, reason="needs 2 GPUs (CPU twin: test_recipes.py)")
def test_the_fp16_recipe_with_clipping_on_two_gpus_matches_one(tmp_path):
    one = run_single(train_and_return_state, [*FP16, f"run.dir={tmp_path / 'one'}"],
                     env=fp32_gpu_env(1))
    two = run_distributed(train_and_return_state, 2, [*FP16, f"run.dir={tmp_path / 'two'}"],
                          env=fp32_gpu_env(2))[0]
    assert one["scaler"]["scale"] == two["scaler"]["scale"]  # no step skipped on one side only
    for name, value in one["model"].items():
        # fp16 autocast rounds activations per shard shape: looser than fp32's parity
        torch.testing.assert_close(two["model"][name], value, rtol=1e-3, atol=1e-4)
