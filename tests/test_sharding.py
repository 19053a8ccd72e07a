"""Memory: ZeRO (`ddp.zero`) and FSDP2 (`mode: fsdp`) with sharded checkpoints, real processes.

The runs are the workers' own `main` in gloo processes forked by the harness
(`tests.helpers.run_workers`): what is tested is what the workers write, read and refuse. The
launcher's part (a mode's keys refused before any worker), `torchrun -m train`, `make eval`
and the converter are tested through the real CLI below; `launch --mode fsdp` training,
checkpointing and resuming end to end in test_fsdp_optim.py. Parity of both with one process
is in test_paths.py, fsdp's evaluation in test_distributed.py.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, gpu_count, gpu_env, run_cli, run_workers
from train.run.checkpoint import Checkpoints
from train.run.sharded import folder_damage, load_model_state_dict

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "default.yaml")
# 16 steps per epoch, 2 epochs; checkpoints at steps 10, 16, 20, 30, 32, the last 3 kept. The
# evaluation batch makes the ranks' batch counts differ (151 samples: 4 batches, 150: 3).
RUN = ["data.synthetic.train_samples=1536", "data.synthetic.test_samples=301",
       "train.batch_size=96", "train.epochs=2", "train.eval_batch_size=50",
       "wandb.mode=disabled", "log.every_steps=4", "checkpoint.every_steps=10",
       "checkpoint.keep=3"]


def launch(run_dir: Path, *extra: str, workers: int = 2, mode: str = "fsdp"):
    """`launch --cpu --gpus WORKERS --mode MODE` as far as the workers go: their code, output
    and files (tests.helpers.run_workers)."""
    return run_workers(workers, CONFIG, *RUN, f"run.dir={run_dir}", f"mode={mode}", *extra)


def last_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def metrics(run_dir: Path) -> list[tuple]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["epoch"], r["step"], r["train_loss"], r["test_accuracy"])
            for r in map(json.loads, lines)]


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def said(result) -> list[str]:
    """The error lines (the other ranks' warnings about the same files may come after)."""
    return [line for line in errors(result) if line.startswith("error: ")]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("fsdp")
    result = launch(run_dir)
    assert result.returncode == 0, result.stderr
    assert "parameters, gradients and optimizer state in 2 shards" in result.stdout
    return run_dir


def copy_run(source: Path, to: Path, keep_steps: tuple[int, ...]) -> Path:
    """A copy of a run folder with only the checkpoints of `keep_steps`."""
    shutil.copytree(source, to)
    for step_file in Checkpoints(to / "checkpoints", keep=9).candidates():
        if int(step_file.stem.split("_")[1]) not in keep_steps:
            step_file.unlink()
            shutil.rmtree(step_file.with_suffix(""), ignore_errors=True)  # fsdp's pieces
    return to


def test_fsdp_saves_one_file_per_rank_beside_each_step_and_a_plain_model_at_the_end(fsdp_run):
    folder = fsdp_run / "checkpoints"
    steps = [p.name for p in Checkpoints(folder, keep=3).candidates()]
    assert steps == ["step_00000032.pt", "step_00000030.pt", "step_00000020.pt"]  # rotated
    folders = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert folders == ["step_00000020", "step_00000030", "step_00000032"]  # theirs go too
    for name in folders:
        assert sorted(p.name for p in (folder / name).iterdir()) == [
            ".metadata", "__0_0.distcp", "__1_0.distcp"]
    step = torch.load(folder / "step_00000032.pt", weights_only=True)
    assert step["sharded"] == "step_00000032" and "model" not in step
    assert "optimizer" not in step and {"scheduler", "ranks", "config"} <= step.keys()
    # Tensors only in the folder (DCP reads anything else with weights_only=False): the
    # optimizer's hyperparameters are in the step file.
    from train.run.sharded import safe_reader

    entries = safe_reader(folder / "step_00000032").read_metadata().state_dict_metadata
    assert {type(m).__name__ for m in entries.values()} == {"TensorStorageMetadata"}
    assert step["sharded_values"]["optimizer"]["param_groups"][0]["lr"] >= 0

    # The run's end gathered the model into last.pt, a plain state_dict like DDP's.
    model = last_model(fsdp_run)
    from models import build_model

    shapes = {k: v.shape for k, v in build_model("lenet", 1, 10, 28).state_dict().items()}
    assert {k: v.shape for k, v in model.items()} == shapes
    assert all(type(v) is torch.Tensor and v.dtype == torch.float32 for v in model.values())
    # Every form reads the same model back; an earlier step holds another one.
    assert_bitwise_equal(load_model_state_dict(fsdp_run), model)
    assert_bitwise_equal(load_model_state_dict(folder / "step_00000032"), model)
    assert_bitwise_equal(load_model_state_dict(folder / "step_00000032.pt"), model)
    earlier = load_model_state_dict(folder / "step_00000030.pt")
    assert not torch.equal(earlier["classifier.3.weight"], model["classifier.3.weight"])


def test_convert_writes_a_sharded_checkpoint_as_one_plain_file(fsdp_run, tmp_path):
    out = tmp_path / "full.pt"
    result = run_cli("tools.convert_checkpoint", str(fsdp_run), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    full = torch.load(out, weights_only=True)
    assert_bitwise_equal(full["model"], last_model(fsdp_run))
    momentum = {k: s["momentum_buffer"] for k, s in full["optimizer"]["state"].items()}
    assert {k: v.shape for k, v in momentum.items()} == {
        k: v.shape for k, v in full["model"].items()}  # whole, keyed by parameter name
    groups = full["optimizer"]["param_groups"]  # from the step file
    assert groups[0]["momentum"] == 0.9 and groups[0]["params"] == list(full["model"])


@pytest.mark.compat
@pytest.mark.timeout(600)  # two runs (and the fixture's, for the first test that uses it)
def test_fsdp_resume_is_bitwise(fsdp_run, tmp_path):
    # A SIGTERM after step 7 is agreed on at step 10, inside the first epoch.
    stopped = launch(tmp_path, "debug.sigterm_rank=1", "debug.sigterm_step=7")
    assert stopped.returncode == 130, stopped.stderr
    assert [p.name for p in Checkpoints(tmp_path / "checkpoints", 3).candidates()] == [
        "step_00000010.pt"]
    again = launch(tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout and "step 10" in again.stdout
    assert_bitwise_equal(last_model(tmp_path), last_model(fsdp_run))
    assert metrics(tmp_path) == metrics(fsdp_run)


@pytest.mark.parametrize("workers", [3, 1])
def test_fsdp_resumes_on_another_number_of_workers_resharded(fsdp_run, tmp_path, workers):
    run_dir = copy_run(fsdp_run, tmp_path / "run", keep_steps=(20,))  # 4 steps into epoch 2
    result = launch(run_dir, "checkpoint.allow_changes=true", workers=workers)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout and "step 20" in result.stdout
    saved = sorted(p.name for p in (run_dir / "checkpoints" / "step_00000032").iterdir())
    assert saved == [".metadata", *(f"__{r}_0.distcp" for r in range(workers))]
    # The same global batches, re-sharded: equal up to summation order. Measured on an AMD
    # EPYC (2026-12-06): at most 9e-8 apart under ATEN_CPU_CAPABILITY=avx2 and avx512, 2.2e-6
    # under `default` (9 of features.3's 25,000 weights over 1e-6); the last two steps of
    # training move each tensor's furthest element by 4e-5 to 9e-4.
    for name, value in last_model(fsdp_run).items():
        torch.testing.assert_close(last_model(run_dir)[name], value, rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(600)  # two runs
def test_a_missing_rank_file_makes_its_step_damaged(fsdp_run, tmp_path):
    run_dir = copy_run(fsdp_run, tmp_path / "run", keep_steps=(20, 30, 32))
    folder = run_dir / "checkpoints"
    (folder / "step_00000032" / "__1_0.distcp").unlink()
    result = launch(run_dir)
    assert result.returncode == 0, result.stderr
    assert (f"skipping checkpoint {folder / 'step_00000032.pt'}: step_00000032/ lacks rank 1's "
            f"file __1_0.distcp") in result.stdout + result.stderr
    assert f"resumed from {folder / 'step_00000030.pt'}" in result.stdout
    assert_bitwise_equal(last_model(run_dir), last_model(fsdp_run))

    for step in ("step_00000020", "step_00000030", "step_00000032"):
        (folder / step / "__0_0.distcp").unlink()
    refused = launch(run_dir)
    assert refused.returncode == 2
    reported = said(refused)  # one line, from one process
    assert len(reported) == 1
    assert reported[0].startswith(f"error: no valid checkpoint in {folder} (3 damaged)")
    converted = run_cli("tools.convert_checkpoint", str(folder / "step_00000032"))
    assert converted.returncode == 2
    assert errors(converted) == [f"error: {folder / 'step_00000032'} is not a complete sharded "
                                 f"checkpoint: step_00000032/ lacks rank 0's file __0_0.distcp"]


def test_an_unfinished_or_truncated_folder_is_damaged(fsdp_run, tmp_path):
    folder = shutil.copytree(fsdp_run / "checkpoints" / "step_00000032", tmp_path / "step_1")
    assert folder_damage(folder) is None
    rank_file = folder / "__1_0.distcp"
    rank_file.write_bytes(rank_file.read_bytes()[:-100])
    assert "has rank 1's file __1_0.distcp truncated" in folder_damage(folder)
    (folder / ".metadata").unlink()  # written last: its save did not finish
    assert folder_damage(folder) == "step_1/ has no .metadata (its save did not finish)"
    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    assert folder_damage(folder) == "step_1/.metadata cannot be read (UnpicklingError)"
    assert not marker.exists()  # read without running anything


class RunsCode:
    """What a .metadata could hold: a command that plain pickle runs while reading it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp")
    result = launch(run_dir, mode="ddp")
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.mark.timeout(600)  # three runs
def test_zero_equals_ddp_bitwise_and_resumes_exactly(ddp_run, tmp_path):
    stopped = launch(tmp_path, "ddp.zero=true", "debug.sigterm_rank=1", "debug.sigterm_step=7",
                     mode="ddp")
    assert stopped.returncode == 130, stopped.stderr
    assert "optimizer state in one shard per rank (ZeRO)" in stopped.stdout
    saved = torch.load(tmp_path / "checkpoints" / "step_00000010.pt", weights_only=True)
    assert sorted(saved["optimizer"]["state"]) == list(range(8))  # every rank's part, whole
    again = launch(tmp_path, "ddp.zero=true", mode="ddp")
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout and "step 10" in again.stdout
    assert_bitwise_equal(last_model(tmp_path), last_model(ddp_run))


def test_single_files_are_not_converted_nor_resumed_in_pieces(ddp_run, tmp_path):
    converted = run_cli("tools.convert_checkpoint", str(ddp_run))
    assert converted.returncode == 2
    assert errors(converted) == [
        f"error: {ddp_run / 'checkpoints' / 'step_00000032.pt'} is a single-file checkpoint "
        f"already (mode ddp): its `model` is a plain state_dict, nothing to convert"]
    run_dir = copy_run(ddp_run, tmp_path / "run", keep_steps=(32,))
    refused = launch(run_dir, "checkpoint.allow_changes=true")  # mode fsdp
    assert refused.returncode == 2
    assert said(refused) == [
        f"error: {run_dir / 'checkpoints' / 'step_00000032.pt'} holds the model and optimizer "
        f"whole (mode ddp) and this mode keeps them in pieces: it cannot resume it; set "
        f"checkpoint.resume=false to start over, or keep the mode"]


@pytest.mark.parametrize("overrides, message", [
    (["mode=fsdp", "scratch.algorithm=naive"],
     "scratch.algorithm=naive is a key of mode scratch, which mode fsdp does not read"),
    (["mode=fsdp", "ddp.find_unused_parameters=true"],
     "ddp.find_unused_parameters=true is a key of mode ddp, which mode fsdp does not read"),
    (["mode=fsdp", "ddp.zero=true"],
     "ddp.zero applies to mode ddp only (mode is fsdp); mode fsdp shards the optimizer state"),
    (["mode=scratch", "ddp.zero=true"], "ddp.zero applies to mode ddp only (mode is scratch)"),
    (["mode=dp", "ddp.zero=true"], "ddp.zero applies to mode ddp only (mode is dp)"),
    (["mode=ddp", "fsdp.reshard_after_forward=false"],
     "fsdp.reshard_after_forward=false applies to mode fsdp only (mode is ddp)"),
])
def test_keys_of_another_mode_are_refused(overrides, message):
    """The check the launcher and every worker run (common/validate.py); the CLI below."""
    from common.errors import UserError
    from common.validate import check_device_options
    from train.config import load_config

    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_device_options(load_config(CONFIG, overrides), "cpu")
    check_device_options(load_config(CONFIG, overrides[:1]), "cpu")  # the mode alone is fine


def test_a_key_of_another_mode_is_one_line_from_the_launcher(tmp_path):
    result = run_cli("launch", "--cpu", "--mode", "fsdp", CONFIG, "scratch.algorithm=naive",
                     f"run.dir={tmp_path / 'r'}")
    assert result.returncode == 2
    assert errors(result) == ["error: scratch.algorithm=naive is a key of mode scratch, which "
                              "mode fsdp does not read (it shards with the fsdp.* keys); remove "
                              "it"]
    assert not (tmp_path / "r").exists()  # nothing written


def test_mode_keys_are_checked_by_the_workers_themselves(tmp_path):
    """Workers without the launcher's checks, as torchrun starts them (run_workers): one line."""
    result = run_workers(2, CONFIG, *RUN, f"run.dir={tmp_path}", "mode=fsdp",
                         "scratch.per_parameter=true")
    assert result.returncode == 2
    reported = [line for line in result.stderr.splitlines() if line.strip()]
    assert reported == ["error: scratch.per_parameter=true is a key of mode scratch, which mode "
                        "fsdp does not read (it shards with the fsdp.* keys); remove it"]


def test_fsdp_bf16_on_the_cpu_is_autocast_over_fp32_shards(tmp_path):
    """CPU twin of the GPU mixed-precision test: on the CPU no MixedPrecisionPolicy (gloo keeps
    fp32 all-gathers); autocast lowers the compute, the shards and last.pt stay fp32."""
    result = launch(tmp_path, "perf.precision=bf16", "train.max_steps=4")
    assert result.returncode == 0, result.stderr
    assert "gathered in" not in result.stdout and "bf16" in result.stdout
    assert all(v.dtype == torch.float32 for v in last_model(tmp_path).values())


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 2, reason="needs 2 GPUs (CPU twin: "
                    "test_fsdp_bf16_on_the_cpu_is_autocast_over_fp32_shards)")
@pytest.mark.parametrize("precision, mode", [("bf16", "fsdp"), ("fp16", "fsdp"),
                                             ("fp16", "ddp")])
def test_mixed_precision_sharded_on_gpus(tmp_path, precision, mode):
    extra = ["ddp.zero=true"] if mode == "ddp" else []
    result = run_cli("launch", "--gpus", "2", "--mode", mode, CONFIG, *RUN, f"run.dir={tmp_path}",
                     f"perf.precision={precision}", *extra, env=gpu_env(2))
    assert result.returncode == 0, result.stderr
    if mode == "fsdp":
        dtype = {"bf16": "bfloat16", "fp16": "float16"}[precision]
        assert f"gathered in {dtype}, gradients reduced in fp32" in result.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["backend"] == "nccl" and summary["final_test_accuracy"] > 0.3
    assert all(v.dtype == torch.float32 for v in last_model(tmp_path).values())  # fp32 masters
    step = torch.load(tmp_path / "checkpoints" / "step_00000032.pt", weights_only=True)
    assert ("scaler" in step) == (precision == "fp16")  # the scale survives a resume


def test_eval_reads_a_sharded_step_file_as_it_reads_last_pt(fsdp_run, tmp_path):
    """`make eval` of mode fsdp's last step file (its model in the DCP folder beside it): the
    run's last epoch's numbers, as from last.pt's whole model."""
    run_dir = copy_run(fsdp_run, tmp_path / "run", keep_steps=(32,))
    step_file = run_dir / "checkpoints" / "step_00000032.pt"
    assert "model" not in torch.load(step_file, weights_only=True)  # in pieces, not whole
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for checkpoint in (step_file, run_dir / "checkpoints" / "last.pt"):
        result = run_cli("train.after.evaluate", str(run_dir), "--workers", "2", "--cpu",
                         "--checkpoint", str(checkpoint))
        assert result.returncode == 0, result.stderr
        summary = json.loads((run_dir / "eval.json").read_text())
        assert summary["top1_accuracy"] == pytest.approx(record["test_accuracy"])
        assert summary["loss"] == pytest.approx(record["test_loss"], rel=1e-5)
