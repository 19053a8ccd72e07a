"""README's "Evaluation, export, inference": the snippet as written, and the model it loads."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import torch

from tests.helpers import PYTHON, REPO, environment, run_cli

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "default.yaml")
TINY = ["data.synthetic.train_samples=1024", "data.synthetic.test_samples=301",
        "train.epochs=2", "train.batch_size=128", "wandb.mode=disabled"]


def readme_snippet() -> str:
    """The python block that README marks as tested by this file."""
    text = (REPO / "README.md").read_text()
    marker = text.index("<!-- tested as written: tests/test_inference.py -->")
    return re.search(r"```python\n(.*?)```", text[marker:], re.S).group(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real run in a fresh folder, in one process: runs/latest names it."""
    root = tmp_path_factory.mktemp("inference")
    result = run_cli("train", CONFIG, *TINY, cwd=root)
    assert result.returncode == 0, result.stderr
    return root


def test_the_readme_snippet_runs_as_written(trained):
    snippet = readme_snippet()
    assert len(snippet.strip().splitlines()) == 5
    done = subprocess.run([PYTHON, "-c", snippet], cwd=trained, capture_output=True, text=True,
                          env=environment({"PYTHONPATH": str(REPO)}), timeout=120)
    assert done.returncode == 0, done.stderr
    printed = re.fullmatch(r"tensor\(\[([\d, ]+)\]\)", done.stdout.strip())
    assert printed, done.stdout
    classes = [int(c) for c in printed.group(1).split(",")]
    assert len(classes) == 8 and all(0 <= c < 10 for c in classes)


def test_the_loaded_model_scores_what_training_measured(trained):
    """The preprocessing comes with the model: on the test set's uint8 images it is as
    accurate as the run's own last evaluation (float order aside: within one sample)."""
    from common.config import load_config
    from train.data import load_datasets
    from train.inference import load_trained

    folder = (trained / "runs" / "latest").resolve()
    model = load_trained(folder)
    cfg = load_config(folder / "config.yaml")
    _, test = load_datasets(cfg.data, cfg.seed)
    with torch.no_grad():
        correct = (model(test.images).argmax(1) == test.labels).sum().item()
        as_floats = model(test.images.float() / 255).argmax(1)
    summary = json.loads((folder / "summary.json").read_text())
    assert abs(correct - summary["final_test_accuracy"] * len(test)) <= 1
    assert summary["final_test_accuracy"] > 0.2  # it did learn (chance: 0.10)
    assert (as_floats == model(test.images).argmax(1)).float().mean() > 0.99
    batch = test.images[:8]
    exported = torch.export.export(model, (batch,))  # README: it exports
    torch.testing.assert_close(exported.module()(batch), model(batch))
