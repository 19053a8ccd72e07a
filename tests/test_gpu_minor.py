"""Small GPU-path choices with CPU twins: the confusion matrix counted on the device (no sync
per batch), TF32 as `perf.tf32` says, checkpoints that a bare torch.load opens anywhere."""

from __future__ import annotations

import contextlib
import subprocess
import warnings

import pytest
import torch
from torch import nn

from common.schema import PerfConfig
from tests.helpers import PYTHON, REPO, environment, gpu_count, gpu_env, run_cli, run_workers
from train.dist import DistContext
from train.loop.evaluation import evaluate
from train.model import set_kernel_choice

CONFIG = str(REPO / "configs" / "default.yaml")


class Fixed(nn.Module):
    """Logits looked up by sample: a known prediction per image."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.logits[index]


def batches(labels: torch.Tensor, size: int, device: torch.device):
    # On the device before the loop: a copy from pageable host memory is a sync of its own.
    index, labels = torch.arange(len(labels), device=device), labels.to(device)
    for start in range(0, len(labels), size):
        yield index[start:start + size], labels[start:start + size]


def evaluate_on(device: torch.device, logits: torch.Tensor, labels: torch.Tensor, size: int):
    ctx = DistContext(rank=0, local_rank=0, world_size=1, local_world_size=1, device=device,
                      backend="none", cpu_threads=1)
    return evaluate(Fixed(logits.to(device)), batches(labels, size, device), ctx,
                    contextlib.nullcontext, num_classes=logits.shape[1])


def reference_confusion(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    confusion = torch.zeros(logits.shape[1], logits.shape[1], dtype=torch.long)
    for true, predicted in zip(labels.tolist(), logits.argmax(1).tolist(), strict=True):
        confusion[true, predicted] += 1
    return confusion


def test_the_confusion_matrix_counts_every_sample_in_its_cell():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 7, generator=generator)
    labels = torch.randint(0, 7, (500,), generator=generator)
    result = evaluate_on(torch.device("cpu"), logits, labels, size=64)
    assert torch.equal(result["confusion"], reference_confusion(logits, labels))
    assert result["samples"] == 500


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 1, reason="needs a GPU (CPU twin: the test above)")
def test_evaluation_syncs_with_the_host_a_fixed_number_of_times_not_per_batch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, 10, generator=generator)
    labels = torch.randint(0, 10, (2000,), generator=generator)
    device = torch.device("cuda")
    evaluate_on(device, logits, labels, size=2000)  # warm-up (allocations, kernels)
    syncs = []
    for size in (2000, 100):  # 1 batch, 20 batches
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = evaluate_on(device, logits, labels, size)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs.append(sum("synchroniz" in str(w.message) for w in caught))
        assert torch.equal(result["confusion"], reference_confusion(logits, labels))
    assert syncs[0] == syncs[1], syncs


@pytest.fixture
def restored_flags():
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    yield
    torch.set_float32_matmul_precision(saved[0])
    (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
     torch.backends.cudnn.deterministic) = saved[1:]


@pytest.mark.parametrize("tf32, matmul, convolutions", [
    ("on", "high", True), ("off", "highest", False), ("torch", "highest", True)])
def test_tf32_is_set_as_the_key_says_on_gpu_workers(restored_flags, tf32, matmul, convolutions):
    # The flags are process settings that exist without a GPU: what a GPU worker would run.
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = True  # torch's own defaults
    set_kernel_choice(PerfConfig(tf32=tf32), "cuda")
    assert torch.get_float32_matmul_precision() == matmul
    assert torch.backends.cudnn.allow_tf32 is convolutions


def test_tf32_leaves_cpu_workers_alone(restored_flags):
    torch.set_float32_matmul_precision("highest")
    set_kernel_choice(PerfConfig(tf32="on"), "cpu")
    assert torch.get_float32_matmul_precision() == "highest"


LOAD = ("import sys, torch; state = torch.load(sys.argv[1], weights_only=True); "
        "kinds = set(); walk = lambda v: kinds.add(v.device.type) if torch.is_tensor(v) else "
        "[walk(x) for x in (v.values() if isinstance(v, dict) else v if isinstance(v, "
        "(list, tuple)) else [])]; walk(state); print(sorted(kinds))")


@pytest.mark.slow
@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        gpu_count() < 1, reason="needs a GPU (CPU twin: its [cpu] case)")])])
def test_a_checkpoint_opens_with_a_bare_torch_load_where_no_gpu_is_visible(tmp_path, device):
    """The run on a GPU through the launcher; its CPU twin's worker without it (run_workers):
    where the checkpoint's tensors live is the worker's business."""
    run = [f"run.dir={tmp_path}", "data.synthetic.train_samples=512",
           "data.synthetic.test_samples=64", "train.epochs=1", "train.max_steps=3",
           "wandb.mode=disabled", "optim.name=adamw"]
    if device == "cpu":
        result = run_workers(1, CONFIG, "dist.device=cpu", *run)
    else:
        result = run_cli("launch", "--gpus", "1", CONFIG, *run, env=gpu_env())
    assert result.returncode == 0, result.stderr
    for path in [*sorted((tmp_path / "checkpoints").glob("step_*.pt")),
                 tmp_path / "checkpoints" / "last.pt"]:
        # CUDA hidden: the machine without the GPU the run had.
        opened = subprocess.run([PYTHON, "-c", LOAD, str(path)], capture_output=True, text=True,
                                env=environment({"CUDA_VISIBLE_DEVICES": ""}), timeout=120)
        assert opened.returncode == 0, opened.stderr
        assert opened.stdout.split() == ["['cpu']"], opened.stdout
