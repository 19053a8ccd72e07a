"""Bad recipe input: one line from one process, exit 2, nothing written (the launcher stops
what it can tell; the workers agree on the rest, also without the launcher)."""

import pytest
import torch

from tests.helpers import REPO, run_cli, run_workers, small_run
from tests.inprocess import launcher_main, run_main

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "default.yaml")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from models import build_model

    folder = tmp_path_factory.mktemp("weights")
    torch.save(build_model("resnet18", 1, 10, 28).state_dict(), folder / "resnet.pt")
    torch.save({"not": "tensors"}, folder / "dict.pt")
    return folder


@pytest.mark.parametrize("override, message", [
    ("model.name=resnet50", "model.name='resnet50' is not a model; did you mean "
                            "torchvision.resnet50"),
    # (optim.name, clip, smoothing and EMA ranges: the same config path, in test_config.py)
    ("train.mixup_alpha=0.2 train.batch_size=98", "need an even batch per worker"),
    ("model.init_from=FILES/dict.pt", "is not a state dict (names to tensors); got a dict"),
])
def test_bad_recipe_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, files, override,
                                                        message):
    """What the launcher refuses itself: its main() in this process (tests/inprocess.py)."""
    run_dir = tmp_path / "run"
    overrides = override.replace("FILES", str(files)).split()
    result = run_main(launcher_main(monkeypatch), "--cpu", CONFIG, *small_run(run_dir),
                      *overrides)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("override, message", [
    ("model.init_from=FILES/resnet.pt", "does not fit the model: keys 8 missing "
                                        "(features.0.weight"),
    ("model.name=torchvision.vit_b_16", "does not take the data's images of shape 1x28x28 "
                                        "(it takes 3x224x224)"),
])
def test_bad_recipe_input_the_workers_find_is_one_line(tmp_path, files, override, message):
    """What only the workers can tell (they build the model): two workers without the
    launcher (run_workers, as torchrun starts them) agree, and the one line is all either
    prints on stderr."""
    run_dir = tmp_path / "run"
    overrides = override.replace("FILES", str(files)).split()
    result = run_workers(2, CONFIG, *small_run(run_dir), *overrides)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not run_dir.exists()


def test_the_launcher_passes_on_the_workers_one_line_on_a_mismatched_init_from(tmp_path, files):
    """The real command line: the workers' line is the launcher's, exit 2."""
    run_dir = tmp_path / "run"
    result = run_cli("launch", "--cpu", CONFIG, *small_run(run_dir),
                     f"model.init_from={files / 'resnet.pt'}")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "does not fit the model: keys 8 missing" in lines[0], result.stderr
    assert not run_dir.exists()
