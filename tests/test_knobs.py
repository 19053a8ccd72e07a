"""The speed knobs on the CPU: each runs, does what it says, and keeps results correct.

Runs are the workers' own code in gloo processes forked by the harness (`run_distributed`,
`run_workers`): the knobs are the workers'; the GPU tests start the real launcher."""

import json
import subprocess

import pytest
import torch

from common.host import keep_freed_memory
from tests.helpers import (
    PYTHON,
    REPO,
    environment,
    gpu_count,
    gpu_env,
    run_cli,
    run_distributed,
    run_workers,
    small_run,
)

# The pure rules behind compile=auto and lr scaling: tests/unit/test_knobs_logic.py.
from tests.workers import (
    ddp_settings,
    page_faults_per_step,
    static_graph_with_no_sync,
    train_and_return_params,
)
from train.run.checkpoint import Checkpoints

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "default.yaml")
SMALL = ["data.synthetic.train_samples=1536", "data.synthetic.test_samples=301",
         "train.epochs=1", "train.max_steps=6", "train.batch_size=96", "run.overwrite=true",
         "wandb.mode=disabled"]


def trained(tmp_path, world_size: int, *extra: str) -> dict[str, torch.Tensor]:
    return run_distributed(train_and_return_params, world_size,
                           [*SMALL, *extra, f"run.dir={tmp_path}"])[0]


def assert_close(a, b, **tolerance) -> None:
    for name in b:
        torch.testing.assert_close(a[name], b[name], **tolerance)


@pytest.fixture(scope="module")
def plain_ddp(tmp_path_factory):
    return trained(tmp_path_factory.mktemp("plain"), 2)


@pytest.mark.parametrize("mode", ["ddp", "scratch"])
def test_accumulating_micro_batches_equals_one_larger_batch(tmp_path, plain_ddp, mode):
    # 96 per step = 48 per worker = 3 micro-batches of 16 with gradient sync on the last only.
    accumulated = trained(tmp_path, 2, f"mode={mode}", "train.grad_accum_steps=3")
    assert_close(accumulated, plain_ddp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hook", ["fp16", "bf16", "powersgd"])
def test_ddp_communication_hooks_compress_the_gradients(tmp_path, plain_ddp, hook):
    start = ["ddp.powersgd_start_step=2"] if hook == "powersgd" else []  # only powersgd reads it
    compressed = trained(tmp_path, 2, f"ddp.comm_hook={hook}", *start)
    # Close to the exact sync, but not equal: the gradients did travel compressed.
    assert_close(compressed, plain_ddp, rtol=0.05, atol=5e-3)
    assert any(not torch.equal(compressed[k], plain_ddp[k]) for k in plain_ddp)


def test_powersgd_state_survives_a_resume(tmp_path):
    """PowerSGD keeps a step count, error feedback and low-rank factors per rank: a run
    resumed mid-epoch (after the warm-up of plain allreduces) continues as if uninterrupted.

    Bitwise: the resumed DDP rebuilds its buckets in gradient order before its first step
    (train/strategies/ddp.py: settle_buckets), so PowerSGD's matrix products see the layout of
    the uninterrupted run (without that, ~3e-8 apart); losing the state moves weights ~2e-2."""
    knobs = ["ddp.comm_hook=powersgd", "ddp.powersgd_start_step=3", "train.max_steps=20",
             "train.epochs=2", "checkpoint.every_steps=5", "checkpoint.keep=3"]
    whole = trained(tmp_path / "whole", 2, *knobs)
    resumed_dir = tmp_path / "resumed"
    trained(resumed_dir, 2, *knobs)
    # Go back to the checkpoint of step 15, inside the first epoch (16 steps each).
    store = Checkpoints(resumed_dir / "checkpoints", keep=3)
    assert [p.name for p in store.candidates()[:2]] == ["step_00000020.pt", "step_00000016.pt"]
    for path in store.candidates()[:2]:
        path.unlink()
    (resumed_dir / "checkpoints" / "last.pt").unlink()
    saved = torch.load(store.candidates()[0], weights_only=True)
    assert saved["step"] == 15 and saved["ranks"][1]["sync"]["iter"] > 3
    resumed = trained(resumed_dir, 2, *knobs)
    assert_close(resumed, whole, rtol=0, atol=0)


def test_ddp_bucket_and_view_knobs_reach_ddp():
    small = run_distributed(ddp_settings, 2, [*SMALL, "ddp.bucket_cap_mb=0.1",
                                              "ddp.gradient_as_bucket_view=false"])[0]
    large = run_distributed(ddp_settings, 2, [*SMALL, "ddp.bucket_cap_mb=25",
                                              "ddp.static_graph=true"])[0]
    assert len(small["bucket_sizes"]) > len(large["bucket_sizes"]) == 1
    assert sum(small["bucket_sizes"]) == sum(large["bucket_sizes"]) == 129_068 * 4
    assert large["static_graph"] and not small["static_graph"]
    assert not any(small["grads_are_bucket_views"])  # gradients copied out of the buckets
    assert all(large["grads_are_bucket_views"])  # gradients are views into the buckets


def test_cpu_workers_keep_freed_memory_for_the_next_step():
    # 40 blocks of 2 MiB are 20,480 pages: taken from the OS again each step unless kept.
    assert max(run_distributed(page_faults_per_step, 2, [])) < 2000
    # Limits the user gave glibc stay as they are (read when the process starts): here every
    # block is mapped anew and given back when freed.
    tunables = "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072"
    probe = "from tests.workers import page_faults_per_step as p; print(p([]))"
    out = subprocess.run([PYTHON, "-c", probe], cwd=REPO, capture_output=True, text=True,
                         env=environment({"PYTHONPATH": str(REPO), "GLIBC_TUNABLES": tunables}),
                         check=True, timeout=120).stdout
    assert float(out.split()[-1]) > 10_000
    assert keep_freed_memory(0) is False  # dist.cpu_malloc_keep_mb=0: glibc's defaults


@pytest.mark.parametrize("extra", [["ddp.static_graph=true"], ["perf.channels_last=true"],
                                   ["ddp.gradient_as_bucket_view=false"]])
def test_knobs_that_must_not_change_results(tmp_path, plain_ddp, extra):
    assert_close(trained(tmp_path, 2, *extra), plain_ddp, rtol=1e-5, atol=1e-6)


def test_unused_parameters_get_a_clear_message_and_the_knob_fixes_it(tmp_path):
    result = run_workers(2, CONFIG, *small_run(tmp_path / "a", "train.max_steps=3",
                                               "debug.unused_parameter=true"))
    assert result.returncode == 3
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "got no gradient in step 2" in errors[0]
    assert "ddp.find_unused_parameters=true" in errors[0]
    fixed = run_workers(2, CONFIG, *small_run(
        tmp_path / "b", "train.max_steps=3", "debug.unused_parameter=true",
        "ddp.find_unused_parameters=true"))
    assert fixed.returncode == 0, fixed.stderr


def test_a_parameter_no_rank_uses_is_left_alone_by_ddp_and_scratch_alike(tmp_path):
    """DDP (find_unused_parameters) leaves a parameter that got no gradient anywhere without
    one, so SGD skips it (no weight decay, no momentum); our allreduce must do the same."""
    ddp = trained(tmp_path / "ddp", 2, "debug.unused_parameter=true",
                  "ddp.find_unused_parameters=true")
    scratch = trained(tmp_path / "scratch", 2, "mode=scratch", "debug.unused_parameter=true")
    assert_close(scratch, ddp, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)  # the same init as the runs: what an untouched parameter still holds
    from models import build_model

    model = build_model("lenet", 1, 10, 28, init="torch")
    model.unused = torch.nn.Linear(2, 2)
    assert torch.equal(ddp["unused.weight"], model.unused.weight.detach())


def test_torch_compile_trains_the_same_and_reports_compile_time(tmp_path, plain_ddp):
    result = run_workers(2, CONFIG, *SMALL, f"run.dir={tmp_path}", "perf.compile=on")
    assert result.returncode == 0, result.stderr
    assert "torch.compile" in result.stdout
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert record["compile_time_s"] > 0.5  # counted apart from the epoch's step time
    # ...and apart from the breakdown's forward+backward time.
    assert record["time_compute_ms"] * record["step"] < 500 * record["compile_time_s"]
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert saved.keys() == plain_ddp.keys()  # no "_orig_mod." prefix from the compiled module
    assert_close(saved, plain_ddp, rtol=1e-4, atol=1e-5)


def test_static_graph_with_accumulation_still_fails_upstream_and_is_refused(tmp_path):
    # The reason for the refusal, checked on plain DDP: when torch fixes pytorch#143580, this
    # fails and the refusal in common/validate.py can go.
    # The refusal itself (one line naming the issue, exit 2) is checked in process with the
    # launcher's other bad input: tests/unit/test_bad_input.py, as are mode dp with
    # perf.compile=on and the GPU-only knobs on the CPU.
    found = run_distributed(static_graph_with_no_sync, 2)
    assert all("expect_autograd_hooks_" in f for f in found), found


def test_bf16_autocast_on_the_cpu_trains_close_to_fp32(tmp_path, plain_ddp):
    result = run_workers(2, CONFIG, *SMALL, f"run.dir={tmp_path}", "perf.precision=bf16")
    assert result.returncode == 0, result.stderr
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(v.dtype == torch.float32 for v in saved.values())  # weights stay fp32
    assert_close(saved, plain_ddp, rtol=0.05, atol=2e-3)


def test_lr_scaling_applies_to_the_run(tmp_path):
    result = run_workers(2, CONFIG, *small_run(
        tmp_path, "train.max_steps=3", "optim.schedule=constant", "optim.warmup_steps=0",
        "optim.warmup_epochs=0", "optim.scale_lr=linear", "train.batch_size=128"))
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    # 0.1 x global batch 128 / base batch 256, whatever the worker count (not x 2 workers)
    assert record["lr"] == pytest.approx(0.05)


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 1, reason="needs a GPU (CPU twin: fp16 error)")
def test_fp16_with_grad_scaler_on_gpu(tmp_path):
    result = run_cli("launch", "--gpus", "1", CONFIG, *small_run(tmp_path, "train.max_steps=4",
                                                                 "perf.precision=fp16"),
                     env=gpu_env())
    assert result.returncode == 0, result.stderr
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", map_location="cpu",
                       weights_only=True)
    assert "scaler" in saved and saved["scaler"]["scale"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 2, reason="needs 2 GPUs (CPU twin: sync_bn error)")
def test_sync_batchnorm_on_gpus(tmp_path):
    result = run_cli("launch", "--gpus", "2", CONFIG, *small_run(
        tmp_path, "train.max_steps=3", "model.name=resnet18", "model.sync_bn=true",
        "train.batch_size=16"), env=gpu_env())
    assert result.returncode == 0, result.stderr
