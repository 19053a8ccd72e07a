"""The shipped recipes load and validate, and run a few steps with tiny overrides."""

import json

import pytest

from tests.helpers import REPO, run_cli
from train.config import load_config

RECIPES = ["resnet50_imagenet.yaml", "resnet50_imagenet_fast.yaml", "resnet18_cifar10.yaml"]
TINY = ["data.name=synthetic", "data.synthetic.channels=3", "data.synthetic.image_size=32",
        "data.image_size=32", "data.synthetic.train_samples=64",
        "data.synthetic.test_samples=40", "data.loader=auto", "train.batch_size=16",
        "train.eval_batch_size=20", "train.epochs=2", "train.max_steps=2",
        "checkpoint.every_steps=0", "wandb.mode=disabled"]


@pytest.mark.parametrize("name", RECIPES)
def test_the_recipes_validate(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.train.label_smoothing == 0.1
    if name.startswith("resnet50"):
        assert cfg.model.name == "torchvision.resnet50" and cfg.perf.precision == "bf16"
        assert cfg.perf.channels_last and cfg.train.ema_decay and cfg.optim.warmup_epochs
        assert cfg.optim.schedule == "cosine" and cfg.data.augment == "imagenet"
    else:
        assert cfg.data.augment == "cifar" and cfg.optim.nesterov


@pytest.mark.slow
# resnet18_cifar10.yaml's parts (the book's ResNet-18, the cifar recipe) train in other tests
@pytest.mark.parametrize("name", ["resnet50_imagenet_fast.yaml"])
def test_the_recipes_train_a_few_steps(tmp_path, name):
    # bf16 is the recipes' GPU setting; on CPUs without bf16 units it is many times slower
    result = run_cli("launch", "--cpu", str(REPO / "configs" / name), *TINY,
                     "perf.precision=fp32", f"run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and record["world_size"] == 2
    if name.startswith("resnet50"):
        assert "test_accuracy_ema" in record and "adamw, clip 5" in result.stdout
