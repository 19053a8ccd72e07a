"""mode fsdp with each optimizer implementation: the one that `auto` picks on GPUs trains,
checkpoints (DCP initializes the optimizer state by a step) and resumes bitwise with 2 gloo
workers; the one that cannot work (fused SGD on DTensor shards) is refused in one line.
The choice table itself is tested in test_optim.py. SGD's runs are `launch --mode fsdp` end to
end; AdamW's are the same workers without the launcher (tests.helpers.run_workers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from common.schema import OptimConfig
from tests.helpers import REPO, gpu_count, gpu_env, run_cli, run_workers
from train.optim import choose_implementation

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "default.yaml")
# 8 steps per epoch, 2 epochs; checkpoints at steps 5, 8, 10, 15, 16.
RUN = ["data.synthetic.train_samples=768", "data.synthetic.test_samples=101",
       "train.batch_size=96", "train.epochs=2", "train.eval_batch_size=50",
       "wandb.mode=disabled", "log.every_steps=4", "checkpoint.every_steps=5",
       "checkpoint.keep=9"]


def launch(run_dir: Path, *extra: str, device: tuple[str, ...] = ("--cpu",), env=None):
    return run_cli("launch", *device, "--mode", "fsdp", CONFIG, *RUN, f"run.dir={run_dir}",
                   *extra, env=env)


def train(run_dir: Path, knobs: list[str], through: str):
    if through == "launch":
        return launch(run_dir, "--gpus", "2", *knobs)
    return run_workers(2, CONFIG, "mode=fsdp", "dist.device=cpu", *RUN, f"run.dir={run_dir}",
                       *knobs)


def last_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def metrics(run_dir: Path) -> list[tuple]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["epoch"], r["step"], r["train_loss"]) for r in map(json.loads, lines)]


def keep_only(run_dir: Path, step: int) -> None:
    """Remove every checkpoint but step `step`'s (its file and its folder of rank pieces)."""
    for path in (run_dir / "checkpoints").glob("step_*"):
        if path.stem != f"step_{step:08d}":
            shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("optimizer, through", [("sgd", "launch"), ("adamw", "workers")])
def test_what_auto_picks_on_gpus_trains_checkpoints_and_resumes_under_fsdp(tmp_path, optimizer,
                                                                           through):
    # On the CPU `auto` is torch's default loop; the kernels it picks on GPUs also run on the
    # CPU, so the CPU run forces them: foreach for SGD, fused for AdamW.
    picked = choose_implementation(OptimConfig(name=optimizer), "fsdp", "cuda")
    knobs = [f"optim.name={optimizer}", f"optim.implementation={picked}",
             *(["optim.lr=0.001"] if optimizer == "adamw" else [])]
    whole = train(tmp_path / "whole", knobs, through)
    assert whole.returncode == 0, whole.stderr
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole", resumed)
    keep_only(resumed, 10)  # two steps into epoch 2: momenta / moments are in it
    (resumed / "checkpoints" / "last.pt").unlink()
    again = train(resumed, knobs, through)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout and "step 10" in again.stdout
    expected, got = last_model(tmp_path / "whole"), last_model(resumed)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert metrics(resumed) == metrics(tmp_path / "whole")


def test_fused_sgd_under_fsdp_is_refused_in_one_line_before_any_worker(tmp_path):
    result = launch(tmp_path / "r", "--gpus", "2", "optim.implementation=fused")
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        "error: optim.implementation=fused does not work with mode fsdp and optim.name=sgd: "
        "torch has no sharded form of its fused SGD (aten._fused_sgd_ on DTensor); set "
        "optim.implementation=foreach or auto"]
    assert not (tmp_path / "r").exists()  # nothing written


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 1, reason="needs a GPU (CPU twin: the sgd case above)")
@pytest.mark.timeout(600)
def test_fsdp_with_sgd_and_auto_steps_and_checkpoints_on_a_gpu(tmp_path):
    result = launch(tmp_path, "--gpus", "1", "train.max_steps=6", device=(),
                    env=gpu_env())
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
