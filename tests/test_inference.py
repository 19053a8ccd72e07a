"""README's "Evaluation, export, inference": the snippets as written (from a folder that is not
the repository's), the model they load, the inputs it refuses, and what `make export` records."""

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


MARKER = "<!-- tested as written: tests/test_inference.py -->"


def readme_snippets() -> list[str]:
    """The python blocks that README marks as tested by this file, in order."""
    text = (REPO / "README.md").read_text()
    return [re.match(r"\s*```python\n(.*?)```", part, re.S).group(1)
            for part in text.split(MARKER)[1:]]


def run_snippet(snippet: str, cwd) -> subprocess.CompletedProcess:
    """`python -c snippet` in `cwd` (not the repository), the project on the path."""
    return subprocess.run([PYTHON, "-c", snippet], cwd=cwd, capture_output=True, text=True,
                          env=environment({"PYTHONPATH": str(REPO)}), timeout=120)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real run in a fresh folder, in one process: runs/latest names it."""
    root = tmp_path_factory.mktemp("inference")
    result = run_cli("train", CONFIG, *TINY, cwd=root)
    assert result.returncode == 0, result.stderr
    return root


def test_the_readme_snippet_runs_as_written(trained):
    snippets = readme_snippets()
    assert len(snippets) == 2 and len(snippets[0].strip().splitlines()) == 6
    done = run_snippet(snippets[0], trained)
    assert done.returncode == 0, done.stderr
    printed = re.fullmatch(r"tensor\(\[([\d, ]+)\]\)", done.stdout.strip())
    assert printed, done.stdout
    classes = [int(c) for c in printed.group(1).split(",")]
    assert len(classes) == 8 and all(0 <= c < 10 for c in classes)


def test_the_loaded_model_scores_what_training_measured(trained):
    """The preprocessing comes with the model: on the test set's uint8 images it is as
    accurate as the run's own last evaluation (float order aside: within one sample)."""
    from common.config import load_config
    from train.after.inference import load_trained
    from train.data import load_datasets

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


def test_the_readme_export_snippet_loads_each_file_as_written(trained):
    """model.pt into the model meta.json names, model.pt2 alone, meta.json's normalization:
    both predict the same classes, named by meta.json's class names."""
    result = run_cli("train.after.export", "runs/latest", cwd=trained)
    assert result.returncode == 0, result.stderr
    done = run_snippet(readme_snippets()[1], trained)
    assert done.returncode == 0, done.stderr
    printed = re.fullmatch(r"(\[.*\]) tensor\(\[([\d, ]+)\]\)", done.stdout.strip())
    assert printed, done.stdout
    meta = json.loads((trained / "runs" / "latest" / "export" / "meta.json").read_text())
    named = [meta["classes"].index(n) for n in json.loads(printed.group(1).replace("'", '"'))]
    assert named == [int(c) for c in printed.group(2).split(",")] and len(named) == 8


def test_export_records_the_resolved_checkpoint_its_step_and_sha256(trained):
    import hashlib

    folder = (trained / "runs" / "latest").resolve()
    result = run_cli("train.after.export", "runs/latest", "--out", "exported", cwd=trained)
    assert result.returncode == 0, result.stderr
    meta = json.loads((trained / "exported" / "meta.json").read_text())
    step_file = folder / "checkpoints" / f"step_{meta['step']:08d}.pt"
    assert meta["run"] == str(folder) and meta["checkpoint"] == str(step_file)
    assert meta["checkpoint_sha256"] == hashlib.sha256(step_file.read_bytes()).hexdigest()
    assert step_file.samefile(folder / "checkpoints" / "last.pt")


def test_images_the_model_was_not_trained_on_are_refused_or_resized(trained):
    from train.after.inference import WrongInput, load_trained

    model = load_trained(trained / "runs" / "latest")
    c, side = model.spec.channels, model.spec.image_size
    with pytest.raises(WrongInput, match=f"trained on {c}-channel images; these have {c + 2}"):
        model(torch.zeros(2, c + 2, side, side, dtype=torch.uint8))
    with pytest.raises(WrongInput, match=f"trained on {side}x{side} images; these are "
                                         f"{side + 4}x{side + 4}.*resize=True"):
        model(torch.zeros(2, c, side + 4, side + 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        model(torch.zeros(c, side, side))
    resizing = load_trained(trained / "runs" / "latest", resize=True)
    # One colour per image: resized to any size it is the same image (up to float sums).
    colours = torch.randint(0, 256, (4, c, 1, 1), dtype=torch.uint8)
    images, big = colours.expand(-1, -1, side, side), colours.expand(-1, -1, 2 * side, 3 * side)
    with torch.no_grad():
        torch.testing.assert_close(resizing(big), model(images), atol=1e-4, rtol=1e-4)
        with pytest.raises(WrongInput, match="channel"):
            resizing(torch.zeros(1, c + 1, side, side))
