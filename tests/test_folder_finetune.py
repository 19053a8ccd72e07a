"""README's "your own images" walkthrough, for real: configs/finetune_folder.yaml on a
generated folder without val/ (pretrained weights planted in a temporary torch hub cache, as
a download would leave them), 2 gloo workers in mode fsdp (sharded checkpoints), stopped by a
planted SIGTERM and resumed; then `make eval CHECKPOINT=best`. One run for all of: the
validation split recorded and used again, the best epoch's checkpoint kept beside the last,
TensorBoard's scalars equal to metrics.jsonl. The parts' logic:
tests/unit/test_folder_finetune.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import Counter

import pytest
import torch

from tests.helpers import REPO, environment, run_cli
from tools.make_images import write_image_folder

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "finetune_folder.yaml")


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The run folder of a walkthrough run that was stopped once and resumed, with the
    environment its commands ran in."""
    from torchvision import models

    base = tmp_path_factory.mktemp("finetune")
    images = write_image_folder(base / "mine", 36, 0, classes=3, min_size=20, max_size=28)
    assert not (images / "val").exists()
    hub = base / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(models.resnet18(num_classes=1000).state_dict(), hub / "resnet18-f37072fd.pth")
    env = {"TORCH_HOME": str(base / "torch_home"), "CUDA_VISIBLE_DEVICES": ""}
    run = base / "run"
    args = ["launch", "--cpu", "--gpus", "2", "--mode", "fsdp", CONFIG, f"data.root={images}",
            f"run.dir={run}", "data.val_fraction=0.25", "data.image_size=32",
            "train.batch_size=8", "train.eval_batch_size=16", "train.epochs=3",
            "checkpoint.keep=1", "checkpoint.best_metric=test_loss", "checkpoint.best_mode=max",
            "wandb.mode=disabled", "log.every_steps=1"]
    stopped = run_cli(*args, "debug.sigterm_rank=1", "debug.sigterm_step=4", env=env)
    assert stopped.returncode == 130, stopped.stderr
    split = json.loads((run / "val_split.json").read_text())
    again = run_cli(*args, env=env)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout
    return run, split, env


def test_the_split_is_recorded_and_every_evaluation_uses_it(finished):
    run, split, _ = finished
    assert json.loads((run / "val_split.json").read_text()) == split  # the resume kept it
    assert split["count"] == len(split["val"]) and split["val_fraction"] == 0.25
    classes = json.loads((run / "classes.json").read_text())
    assert {name.split("/")[0] for name in split["val"]} == set(classes)  # every class held out
    done = records(run)
    assert [r["epoch"] for r in done] == [1, 2, 3]
    assert {r["test_samples"] for r in done} == {split["count"]}


def test_the_best_epoch_is_kept_beside_the_last_and_make_eval_takes_it(finished):
    run, split, env = finished
    done = records(run)
    best = max(done, key=lambda r: r["test_loss"])  # best_mode=max: the first of the highest
    kept = json.loads((run / "checkpoints" / "best.json").read_text())
    assert (kept["step"], kept["epoch"]) == (best["step"], best["epoch"])
    folder = run / "checkpoints"
    named = folder / f"step_{best['step']:08d}.pt"
    assert (folder / "best.pt").samefile(named)
    assert (folder / f"step_{best['step']:08d}" / ".metadata").is_file()  # its fsdp pieces
    # checkpoint.keep=1: the newest and the best, nothing else
    assert {p.name for p in folder.glob("step_*.pt")} == {
        named.name, f"step_{done[-1]['step']:08d}.pt"}
    made = subprocess.run(["make", "-s", "-o", ".venv/.installed", "eval", f"RUN={run}",
                           "CHECKPOINT=best", "WORKERS=2"], cwd=REPO, text=True,
                          capture_output=True, env=environment(env), timeout=300)
    assert made.returncode == 0, made.stderr
    result = json.loads((run / "eval.json").read_text())
    assert result["checkpoint"] == str(named.resolve()) and result["step"] == best["step"]
    assert result["samples"] == split["count"]
    # The same weights on the same held-out files: what training measured at that epoch.
    assert result["top1_accuracy"] == pytest.approx(best["test_accuracy"], abs=1e-9)
    assert result["loss"] == pytest.approx(best["test_loss"], rel=1e-4)


def test_evaluation_on_a_grown_copy_holds_out_the_recorded_files(finished):
    """A node-local copy that has gained images since: the recorded split still decides what
    is held out (computed anew it would hold out one more image per class)."""
    run, split, env = finished
    copy = shutil.copytree(run.parent / "mine", run.parent / "copy")
    for folder in (copy / "train").iterdir():
        for i, image in enumerate(sorted(folder.iterdir())[:4]):
            shutil.copy(image, folder / f"new_{i}.jpg")
    done = run_cli("train.after.evaluate", str(run), "--checkpoint", "last", f"data.root={copy}",
                   env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads((run / "eval.json").read_text())
    per_class = Counter(name.split("/")[0] for name in split["val"])
    assert [sum(row) for row in result["confusion"]] == [
        per_class[name] for name in result["per_class_accuracy"]]


def test_tensorboard_holds_the_scalars_of_metrics_jsonl(finished):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, _ = finished
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for record in records(run):
        numbers = {k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for key, value in numbers.items():
            found = [e.value for e in events.Scalars(f"epoch/{key}") if e.step == record["step"]]
            assert found and found[-1] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    assert {"train/loss", "train/lr"} <= tags
    assert os.listdir(run / "tensorboard")  # one event file per segment of the job
