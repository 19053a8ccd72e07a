"""The GPU path: resume, comm hooks, compile, fp16 accumulation, the doctor's and benchmarks'
collectives, datasets off the device, stalls, SyncBatchNorm, two nodes and the figures.

Cases marked `gpu` run on CUDA workers and are skipped without enough GPUs; each names its
CPU twin (a `cpu` case of the same test where the CPU can run it). Where a test needs two ranks
and the machine has one GPU, two workers share it with gloo (common/host.py `gpu_of_worker`):
NCCL refuses two ranks on one GPU, gloo on CUDA exercises the same placement, gathers and resume.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import PYTHON, REPO, free_port, gpu_count, gpu_env, run_cli, run_distributed
from tests.workers import resume_and_report, sync_bn_statistics, tensor_devices_in_checkpoint

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "default.yaml")
# 12 steps per epoch at 128, 2 epochs; stops are agreed at steps 5, 10, ... (on GPUs at the
# logged steps: log.every_steps=5).
RUN = ["data.synthetic.train_samples=1536", "data.synthetic.test_samples=301",
       "train.batch_size=128", "train.epochs=2", "wandb.mode=disabled", "log.every_steps=5"]
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}  # GPU kernels round differently per shard shape


def on_gpus(count: int, twin: str) -> list[pytest.MarkDecorator]:
    return [pytest.mark.gpu,
            pytest.mark.skipif(gpu_count() < count, reason=f"needs {count} GPU(s) (CPU twin: "
                                                           f"{twin})")]


# Where the workers run: launcher flags, config overrides, environment of the processes.
PLACES = {
    "cpu": (["--cpu"], ["dist.device=cpu"], None),
    "nccl": ([], ["dist.device=cuda"], "gpus"),
    "gloo-cuda": ([], ["dist.device=cuda", "dist.backend=gloo"], "gpus"),
}


def place(where: str, workers: int) -> tuple[list[str], list[str], dict | None]:
    flags, overrides, env = PLACES[where]
    # TF32 off: fp32 convolutions in TF32 differ by ~1e-3 between shard shapes (test_gpu.py).
    env = {**gpu_env(), "NVIDIA_TF32_OVERRIDE": "0"} if env else None
    return [*flags, "--gpus", str(workers)], overrides, env


def params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu",
                      weights_only=True)["model"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tolerance) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **(tolerance or TOLERANCE))


def launch(where: str, workers: int, run_dir: Path, *extra: str,
           timeout: float = 300) -> subprocess.CompletedProcess:
    flags, overrides, env = place(where, workers)
    return run_cli("launch", *flags, CONFIG, *RUN, *overrides, f"run.dir={run_dir}", *extra,
                   env=env, timeout=timeout)


# --- resume ---------------------------------------------------------------------------------


@pytest.mark.parametrize("where, workers", [
    pytest.param("cpu", 2, id="cpu"),
    pytest.param("nccl", 1, id="nccl-1gpu", marks=on_gpus(1, "its [cpu] case")),
    pytest.param("nccl", 2, id="nccl-2gpus", marks=on_gpus(2, "its [cpu] case")),
    pytest.param("gloo-cuda", 2, id="gloo-2workers-1gpu", marks=on_gpus(1, "its [cpu] case")),
])
def test_resume_puts_every_part_on_the_workers_device_and_restores_rng(tmp_path, where,
                                                                       workers):
    stopped = launch(where, workers, tmp_path, "debug.sigterm_rank=0", "debug.sigterm_step=3")
    assert stopped.returncode == 130, stopped.stderr
    _, overrides, env = place(where, workers)
    reports = run_distributed(resume_and_report, workers, [*RUN, *overrides,
                                                           f"run.dir={tmp_path}"], env=env)
    expected = {"cpu": ["cpu"] * workers, "nccl": [f"cuda:{r}" for r in range(workers)],
                "gloo-cuda": ["cuda:0"] * workers}[where]
    assert [r["device"] for r in reports] == expected  # the last rank on the last GPU
    for report in reports:
        assert report["step"] == 5  # the stop agreed after the SIGTERM of step 3
        # Weights and momentum on this worker's device, none of it on another GPU (GPU 0).
        assert report["params"] == report["optimizer"] == [report["device"]]
        assert report["momenta"] > 0 and report["other_gpus_bytes"] == 0
        assert report["rng"] and all(report["rng"].values()), report["rng"]
        assert report["finished_step"] == 24  # and training went on from there to the end


@pytest.fixture(scope="module")
def whole_runs(tmp_path_factory):
    """Uninterrupted deterministic runs, one per place, made once."""
    made: dict[tuple[str, int], Path] = {}

    def get(where: str, workers: int) -> Path:
        if (where, workers) not in made:
            run_dir = tmp_path_factory.mktemp(f"whole-{where}-{workers}")
            result = launch(where, workers, run_dir, "perf.deterministic=true",
                            "checkpoint.every_steps=4")
            assert result.returncode == 0, result.stderr
            made[where, workers] = run_dir
        return made[where, workers]

    return get


def _restarted(where: str, workers: int, run_dir: Path) -> None:
    """A worker killed with SIGKILL once a checkpoint exists; torchrun restarts the group."""
    flags, overrides, env = place(where, workers)
    environment = {k: v for k, v in {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}.items()
                   if v is not None}
    proc = subprocess.Popen(
        [PYTHON, "-m", "launch", *flags, "--max-restarts", "1", CONFIG, *RUN, *overrides,
         f"run.dir={run_dir}", "perf.deterministic=true", "checkpoint.every_steps=4",
         # A GPU runs these steps in well under a second: a stall in step 6 (after the first
         # checkpoint) leaves the time to kill the worker mid-run.
         "debug.stall_rank=0", "debug.stall_step=6", "debug.stall_seconds=5"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    import psutil

    deadline = time.monotonic() + 180
    while not list((run_dir / "checkpoints").glob("step_*.pt")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.1)
    psutil.Process(proc.pid).children(recursive=True)[-1].send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out.count("resumed from") == 1


TWINS = ("test_fault_tolerance.py: test_interrupt_checkpoints_at_a_step_boundary_and_resume_"
         "is_bitwise, test_a_killed_worker_restarts_the_group_which_resumes")


@pytest.mark.parametrize("where, workers, how", [
    pytest.param("nccl", 1, "sigterm", id="nccl-1gpu-sigterm", marks=on_gpus(1, TWINS)),
    pytest.param("nccl", 1, "restart", id="nccl-1gpu-restart", marks=on_gpus(1, TWINS)),
    pytest.param("gloo-cuda", 2, "sigterm", id="gloo-2workers-1gpu-sigterm",
                 marks=on_gpus(1, TWINS)),
])
def test_a_gpu_run_stopped_or_restarted_resumes_bitwise(tmp_path, whole_runs, where, workers,
                                                        how):
    if how == "restart":
        _restarted(where, workers, tmp_path)
    else:
        knobs = ["perf.deterministic=true", "checkpoint.every_steps=4"]
        stopped = launch(where, workers, tmp_path, *knobs, "debug.sigterm_rank=0",
                         "debug.sigterm_step=8")
        assert stopped.returncode == 130, stopped.stderr
        again = launch(where, workers, tmp_path, *knobs)
        assert again.returncode == 0, again.stderr
        assert "resumed from" in again.stdout
    whole = whole_runs(where, workers)
    assert_bitwise(params(tmp_path), params(whole))
    mine, theirs = records(tmp_path), records(whole)
    assert [(r["step"], r["train_loss"], r["test_accuracy"]) for r in mine] == [
        (r["step"], r["train_loss"], r["test_accuracy"]) for r in theirs]


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 1, reason="needs a GPU (CPU twins: test_knobs.py "
                                            "test_ddp_communication_hooks_compress_the_gradients, "
                                            "test_powersgd_state_survives_a_resume)")
def test_comm_hooks_on_nccl_and_powersgd_survives_a_resume(tmp_path):
    workers = min(2, gpu_count())
    for hook in ("fp16", "bf16"):  # stateless: they train
        result = launch("nccl", workers, tmp_path / hook, f"ddp.comm_hook={hook}",
                        "train.max_steps=6")
        assert result.returncode == 0, result.stderr
        assert all(torch.isfinite(v).all() for v in params(tmp_path / hook).values())
    knobs = ["ddp.comm_hook=powersgd", "ddp.powersgd_start_step=3", "checkpoint.every_steps=5",
             "checkpoint.keep=5", "perf.deterministic=true"]
    whole = launch("nccl", workers, tmp_path / "whole", *knobs)
    assert whole.returncode == 0, whole.stderr
    resumed = tmp_path / "resumed"
    first = launch("nccl", workers, resumed, *knobs)
    assert first.returncode == 0, first.stderr
    checkpoints = sorted((resumed / "checkpoints").glob("step_*.pt"))
    # Rank parts (RNG, totals, PowerSGD's error feedback and factors) travel to rank 0 on the
    # CPU: unpickled there, CUDA tensors would land on every rank's GPU.
    saved = run_distributed(tensor_devices_in_checkpoint, 1, str(checkpoints[-1]),
                            env=gpu_env(), launched=False)[0]
    assert saved["ranks"] == ["cpu"], saved
    for path in checkpoints:  # back to step 15, inside the second epoch
        if int(path.stem.split("_")[1]) > 15:
            path.unlink()
            path.with_name(path.name + ".sha256").unlink(missing_ok=True)
    (resumed / "checkpoints" / "last.pt").unlink()
    again = launch("nccl", workers, resumed, *knobs)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout and "step 15" in again.stdout
    # The resumed DDP settles its buckets first (test_knobs.py): equal within NCCL's rounding
    # (its kernels may pick other algorithms per launch); losing the state moves ~1e-2.
    assert_close(params(resumed), params(tmp_path / "whole"), rtol=1e-4, atol=1e-5)


# --- compile, fp16 accumulation -------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 1, reason="needs a GPU (CPU twins: test_knobs.py "
                                            "test_torch_compile_trains_the_same_and_reports_"
                                            "compile_time, test_dp_with_compile_on_is_one_clear_"
                                            "error)")
def test_compile_with_ddp_on_a_gpu_and_dp_compile_refused(tmp_path):
    plain = launch("nccl", 1, tmp_path / "plain", "train.max_steps=8")
    assert plain.returncode == 0, plain.stderr
    compiled = launch("nccl", 1, tmp_path / "compiled", "train.max_steps=8", "perf.compile=on")
    assert compiled.returncode == 0, compiled.stderr
    assert "torch.compile" in compiled.stdout
    assert records(tmp_path / "compiled")[0]["compile_time_s"] > 0
    saved = params(tmp_path / "compiled")
    assert not any("_orig_mod" in k for k in saved)
    # Inductor fuses kernels differently from eager: close, not equal.
    assert_close(saved, params(tmp_path / "plain"), rtol=1e-3, atol=1e-4)
    refused = run_cli("launch", "--mode", "dp", "--gpus", "1", CONFIG, *RUN,
                      f"run.dir={tmp_path / 'dp'}", "perf.compile=on", env=gpu_env())
    assert refused.returncode == 2
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "perf.compile=on does not work with mode dp" in lines[0]


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 1, reason="needs a GPU (CPU twin: test_knobs.py "
                                            "test_accumulating_micro_batches_equals_one_larger_"
                                            "batch; fp16 is refused on the CPU)")
def test_accumulation_with_the_fp16_grad_scaler(tmp_path):
    fp16 = ["perf.precision=fp16", "train.max_steps=6"]
    one = launch("nccl", 1, tmp_path / "one", *fp16)
    accumulated = launch("nccl", 1, tmp_path / "acc", *fp16, "train.grad_accum_steps=4")
    assert one.returncode == 0, one.stderr
    assert accumulated.returncode == 0, accumulated.stderr
    state = torch.load(tmp_path / "acc" / "checkpoints" / "last.pt", map_location="cpu",
                       weights_only=True)
    # The scaler stepped once per optimizer step, not per micro-batch, and found no overflow.
    assert state["scaler"]["_growth_tracker"] == 6 and state["scaler"]["scale"] == 2.0**16
    # fp16 rounds per micro-batch: close to the one-batch run, not equal.
    assert_close(params(tmp_path / "acc"), params(tmp_path / "one"), rtol=2e-2, atol=2e-3)


# --- collectives of the doctor and the benchmarks -------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 1, reason="needs a GPU (CPU twins: test_doctor.py "
                                            "test_default_config_is_ready_to_launch, the allreduce "
                                            "row on gloo; make bench)")
def test_doctor_allreduce_and_comm_benchmarks_on_nccl():
    from launch.doctor import timed_allreduce
    from tools.bench import comm

    workers, env = min(2, gpu_count()), gpu_env()
    seconds = run_distributed(timed_allreduce, workers, "nccl", "cuda", 4 * 2**20, env=env)
    assert len(set(seconds)) == 1 and 0 < seconds[0] < 5  # the slowest rank's, on every rank
    sweep = run_distributed(comm.allreduce_sweep, workers, env=env)[0]
    assert sweep["device"] == "cuda" and len(sweep["rows"]) == len(comm.SIZES)
    # One GPU: one rank, nothing travels, busbw is 0 by its definition (2(n-1)/n).
    assert all(row[name]["algbw_GBps"] > 0 and row[name]["busbw_GBps"] >= 0
               for row in sweep["rows"] for name in ("torch", "ring", "naive"))
    grads = run_distributed(comm.resnet_gradient_sync, workers, env=env)[0]
    assert all(grads[k] > 0 for k in ("torch_flat", "ring_per_parameter", "ring_bucketed_25mb"))
    ddp = run_distributed(comm.ddp_buckets_and_overlap, workers, env=env)[0]
    assert ddp["step_s"] > 0 and 0 <= ddp["hidden_fraction"] <= 1


# --- data off the device --------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 1, reason="needs a GPU (CPU twin: test_data.py "
                                            "test_copying_ahead_gives_the_same_batches_in_the_"
                                            "same_order)")
def test_a_dataset_in_host_memory_trains_bitwise_like_one_on_the_gpu(tmp_path):
    knobs = ["perf.deterministic=true", "train.max_steps=16"]
    on_gpu = launch("nccl", 1, tmp_path / "on", *knobs)
    in_host = launch("nccl", 1, tmp_path / "off", *knobs, "data.on_device=false")
    assert on_gpu.returncode == 0, on_gpu.stderr
    assert in_host.returncode == 0, in_host.stderr
    assert "stays in host memory" in in_host.stdout + in_host.stderr
    assert_bitwise(params(tmp_path / "off"), params(tmp_path / "on"))
    assert [r["test_accuracy"] for r in records(tmp_path / "off")] == [
        r["test_accuracy"] for r in records(tmp_path / "on")]


# --- a stalled rank on NCCL -----------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 2, reason="needs 2 GPUs (CPU twins: test_fault_tolerance.py "
                                            "test_a_stalled_worker_makes_everyone_exit_with_a_"
                                            "message; test_a_sigabrt_on_nccl_is_explained_as_a_"
                                            "collective_timeout)")
def test_a_stall_on_nccl_is_explained_and_leaves_flight_recorder_traces(tmp_path):
    started = time.monotonic()
    result = launch("nccl", 2, tmp_path, "dist.timeout_s=10", "debug.stall_rank=1",
                    "debug.stall_step=3", "debug.stall_seconds=120", timeout=240)
    # The watchdog aborts the process (SIGABRT, 134), or the collective raises first (3).
    assert result.returncode in (3, 134), result.stderr
    assert time.monotonic() - started < 150
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "dist.timeout_s=10" in errors[0], result.stderr
    if result.returncode == 134:
        assert "SIGABRT" in errors[0] and "fr_trace" in errors[0]
    traces = sorted(tmp_path.glob("nccl_trace_rank_*"))
    assert traces and all(t.stat().st_size > 0 for t in traces), list(tmp_path.iterdir())


# --- SyncBatchNorm --------------------------------------------------------------------------


SYNC_BN_TWIN = "test_knobs.py test_gpu_only_knobs_on_the_cpu_are_one_clear_error (sync_bn)"


@pytest.mark.parametrize("where", [
    pytest.param("nccl", marks=on_gpus(2, SYNC_BN_TWIN)),
    pytest.param("gloo-cuda", marks=on_gpus(1, SYNC_BN_TWIN)),
])
def test_sync_batchnorm_keeps_the_statistics_of_the_global_batch(where):
    _, overrides, env = place(where, 2)
    found = run_distributed(sync_bn_statistics, 2, [*RUN, *overrides, "model.name=resnet18",
                                                    "model.sync_bn=true"], env=env)
    for rank in found:
        assert rank["sync_layers"] > 0
        assert rank["synced_vs_global"] < 1e-4  # the statistics of both halves together
        assert rank["local_vs_global"] > 1e-3  # what per-device BatchNorm would have kept


# --- two nodes ------------------------------------------------------------------------------


def two_nodes(where: str, run_dir: Path) -> list[subprocess.CompletedProcess]:
    """Two launchers on this machine as nodes 0 and 1 of one job, one GPU worker each: NCCL
    with a GPU per node, or both on GPU 0 with gloo."""
    _, overrides, env = place(where, 1)
    port = str(free_port())
    nodes = []
    for rank in range(2):
        node_env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
        if where == "nccl":
            node_env["CUDA_VISIBLE_DEVICES"] = node_env["CUDA_VISIBLE_DEVICES"].split(",")[rank] \
                if node_env.get("CUDA_VISIBLE_DEVICES") else str(rank)
        nodes.append(subprocess.Popen(
            [PYTHON, "-m", "launch", "--gpus", "1", "--nnodes", "2", "--node-rank", str(rank),
             "--master-addr", "127.0.0.1", "--master-port", port, CONFIG, *RUN, *overrides,
             f"run.dir={run_dir}", "perf.deterministic=true"], cwd=REPO, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={k: v for k, v in node_env.items() if v is not None}))
    done = []
    for node in nodes:
        out, err = node.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(node.args, node.returncode, out, err))
    return done


NODES_TWIN = "test_fault_tolerance.py test_two_launchers_act_as_two_nodes"


@pytest.mark.parametrize("where", [
    pytest.param("nccl", marks=on_gpus(2, NODES_TWIN)),
    pytest.param("gloo-cuda", marks=on_gpus(1, NODES_TWIN)),
])
def test_two_launchers_act_as_two_gpu_nodes(tmp_path, where):
    for node in two_nodes(where, tmp_path / "nodes"):
        assert node.returncode == 0, node.stderr
    one_node = launch(where, 2, tmp_path / "one", "perf.deterministic=true")
    assert one_node.returncode == 0, one_node.stderr
    assert json.loads((tmp_path / "nodes" / "summary.json").read_text())["world_size"] == 2
    assert_close(params(tmp_path / "nodes"), params(tmp_path / "one"))


# --- the figures ----------------------------------------------------------------------------


@pytest.mark.parametrize("where", [
    pytest.param("cpu", id="cpu"),
    pytest.param("nccl", id="nccl", marks=on_gpus(1, "its [cpu] case")),
])
def test_figures_are_sane(tmp_path, where):
    # The test set evaluated in one large batch: its memory peak dwarfs training's, and must
    # not show in the next epoch's peak (the counter is reset per epoch on GPUs).
    result = launch(where, 1, tmp_path, "data.synthetic.test_samples=4096",
                    "train.eval_batch_size=4096")
    assert result.returncode == 0, result.stderr
    first, second = records(tmp_path)
    for record in (first, second):
        assert record["epoch_time_s"] > 0 and record["samples_per_s"] > 0
        assert record["samples_per_s"] == pytest.approx(12 * 128 / record["epoch_time_s"])
        assert all(record[f"time_{p}_ms"] >= 0 for p in ("data", "compute", "optim"))
    # One worker has nothing to synchronize: no probe, and sync is n/a in every epoch (the
    # probe's estimate with several workers: tests/test_monitoring.py, tests/test_plot.py).
    for record in (first, second):
        assert record["time_sync_ms"] is None and "one worker" in record["sync_method"]
    for record in (first, second):
        assert 0 < record["peak_memory_mb"] <= record["peak_memory_mb_max"]
        assert record["peak_memory_mb_spread"] == 0  # one worker, one device
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["wall_time_s"] >= summary["train_time_s"]
    if where != "cpu":  # the CPU's peak (RSS) cannot be reset
        assert second["peak_memory_mb"] < 1.5 * first["peak_memory_mb"]


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 2, reason="needs 2 GPUs (CPU twin: test_figures_are_sane[cpu])")
def test_dataparallel_reports_every_gpus_peak(tmp_path):
    result = run_cli("launch", "--mode", "dp", "--gpus", "2", CONFIG, *RUN,
                     f"run.dir={tmp_path}", env=gpu_env())
    assert result.returncode == 0, result.stderr
    for record in records(tmp_path):
        peaks = record["peak_memory_mb_gpus"]
        assert len(peaks) == 2 and all(p > 0 for p in peaks)
        assert record["peak_memory_mb_max"] == max(peaks)
        assert record["peak_memory_mb_spread"] == pytest.approx(max(peaks) - min(peaks))
        assert peaks[0] >= peaks[1]  # the first GPU gathers the outputs and the loss


# --- policies that decide the GPU path, on the CPU ------------------------------------------


def test_gloo_workers_share_gpus_and_nccl_gets_one_each(monkeypatch):
    import common.host
    import launch.job
    from common.errors import UserError
    from common.host import gpu_of_worker
    from launch.job import count_workers

    for module in (common.host, launch.job):
        monkeypatch.setattr(module, "visible_gpus", lambda: 2)
    assert [gpu_of_worker(r, 2, "nccl") for r in range(2)] == [0, 1]
    assert [gpu_of_worker(r, 5, "gloo") for r in range(5)] == [0, 1, 0, 1, 0]
    with pytest.raises(UserError, match="NCCL runs one worker per GPU"):
        gpu_of_worker(0, 3, "nccl")
    assert count_workers(None, "cuda")[0] == 2
    assert count_workers(4, "cuda", "gloo") == (
        4, "4 GPU worker(s) with gloo on 2 visible GPU(s), sharing them (local rank mod 2)")
    with pytest.raises(UserError, match="3 GPUs asked .*dist.backend=gloo lets workers share"):
        count_workers(3, "cuda", "auto")


def _plan(backend: str, run_dir: Path):
    from launch.plan import Plan
    from train.config import load_config

    cfg = load_config(CONFIG, [f"run.dir={run_dir}", "dist.timeout_s=7"])
    return Plan(cfg, 2, 1, 0, "cuda" if backend == "nccl" else "cpu", backend, 1, ["-m"], [],
                "")


def test_nccl_workers_get_the_flight_recorder_writing_into_the_run_folder(tmp_path,
                                                                          monkeypatch):
    from launch.plan import worker_environment

    for key in ("TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT",
                "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"):
        monkeypatch.delenv(key, raising=False)
    env = worker_environment(_plan("nccl", tmp_path / "run"))
    assert int(env["TORCH_NCCL_TRACE_BUFFER_SIZE"]) > 0 and env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == str(tmp_path / "run" / "nccl_trace_rank_")
    assert "TORCH_NCCL_TRACE_BUFFER_SIZE" not in worker_environment(_plan("gloo", tmp_path))
    monkeypatch.setenv("TORCH_NCCL_TRACE_BUFFER_SIZE", "50")  # the user's own value stays
    assert "TORCH_NCCL_TRACE_BUFFER_SIZE" not in worker_environment(_plan("nccl", tmp_path))


def test_a_sigabrt_on_nccl_is_explained_as_a_collective_timeout(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    from launch.agent import report_failures
    from launch.plan import abort_note

    monkeypatch.delenv("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", raising=False)
    # As torchrun reports a stall on NCCL: rank 0's watchdog aborted it; rank 1, the stalled
    # one, was stopped with SIGTERM afterwards.
    failures = {0: SimpleNamespace(exitcode=-signal.SIGABRT, timestamp=10),
                1: SimpleNamespace(exitcode=-signal.SIGTERM, timestamp=11)}
    code = report_failures(failures, abort_note(_plan("nccl", tmp_path)))
    line = capsys.readouterr().err.strip()
    assert code == 128 + signal.SIGABRT and "\n" not in line
    assert line.startswith("error: worker rank 0 was killed by SIGABRT: on NCCL")
    assert "dist.timeout_s=7 s" in line and "ranks that did not abort: 1" in line
    assert f"fr_trace {tmp_path} -p nccl_trace_rank_" in line
    assert abort_note(_plan("gloo", tmp_path)) is None
    report_failures(failures, None)  # gloo: the plain line
    assert "was killed by signal 6; the other workers were stopped" in capsys.readouterr().err
