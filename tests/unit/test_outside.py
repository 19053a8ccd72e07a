"""The boundary to code this project does not own (common/errors.py `outside`): each kind of
outside failure, planted, becomes one line naming the thing and the cause, with the exit code
of its class, and our own bugs stay tracebacks. The cross-rank cases (the line agreed, every
rank exiting with its code) run as real processes in tests/test_durability.py."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from common.config import to_dict
from common.errors import UserError, WriteFailed, outside, translated
from models.catalog import build
from models.pretrained import load_published, weights_file
from tests.inprocess import run_main
from tests.workers import DEFAULT_CONFIG
from tools.convert_checkpoint import main as convert_main
from train.after.loaded import open_trained, read_checkpoint
from train.config import load_config
from train.data.build import build_data
from train.dist import DistContext, agree, local_main_first
from train.model import build_plain_model

CPU = DistContext(0, 0, 1, 1, torch.device("cpu"), "none", 1)

USER_CODE = '''
import torch
from torch import nn

def broken_builder(num_classes, in_channels, image_size):
    raise ValueError("layer sizes do not add up")

def small_builder(num_classes, in_channels, image_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, num_classes))

class Pairs:
    def __init__(self, n, broken_len=False):
        self.n, self.broken_len = n, broken_len
    def __len__(self):
        if self.broken_len:
            raise KeyError("no length yet")
        return self.n
    def __getitem__(self, i):
        if i >= self.n:
            raise IndexError(i)
        return torch.full((3, 12, 12), (i * 37) % 256, dtype=torch.uint8), i % 2

def good():
    return Pairs(20), Pairs(6)

def no_length():
    return Pairs(20, broken_len=True), Pairs(6)
'''


@pytest.fixture()
def user_code(tmp_path, monkeypatch) -> str:
    (tmp_path / "user_code.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_code"


def test_the_boundary_names_the_thing_and_the_cause_with_the_exit_code_of_its_class():
    with pytest.raises(UserError) as err:
        with outside("the thing"):
            raise ValueError("first line\nsecond line")
    assert str(err.value) == "the thing failed (ValueError: first line)"
    assert err.value.exit_code == 2
    full = translated(OSError(errno.ENOSPC, "No space left on device", "/runs/a"), "writing x")
    assert isinstance(full, WriteFailed) and full.exit_code == 4
    assert str(full) == "writing x failed (No space left on device: /runs/a)"
    ours = UserError("our own line")
    with pytest.raises(UserError) as err, outside("the thing"):
        raise ours
    assert err.value is ours  # passes unchanged
    with pytest.raises(KeyboardInterrupt), outside("the thing"):
        raise KeyboardInterrupt


def test_a_model_builder_that_raises_is_one_line(user_code):
    name = f"python:{user_code}:broken_builder"
    with pytest.raises(UserError) as err:
        build(name, 3, 10, 12)
    assert str(err.value) == (f"the model builder model.name={name} failed (ValueError: layer "
                              f"sizes do not add up)")
    assert err.value.exit_code == 2


def test_a_dataset_factory_whose_dataset_raises_is_one_line(user_code):
    cfg = load_config(DEFAULT_CONFIG, ["data.name=python",
                                       f"data.factory={user_code}:no_length"]).data
    with pytest.raises(UserError) as err:
        build_data(cfg, 0, CPU, 10, 4, False)
    assert str(err.value) == (f"the datasets of data.factory={user_code}:no_length failed "
                              f"(KeyError: 'no length yet')")


def test_a_half_written_weights_file_in_the_hub_cache_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    path = weights_file("resnet18")[2]
    path.parent.mkdir(parents=True)
    whole = torch.nn.Linear(4, 2).state_dict()
    torch.save(whole, path)
    path.write_bytes(path.read_bytes()[:100])  # a download that was cut
    with pytest.raises(UserError) as err:
        load_published(nn.Linear(4, 2), "resnet18")
    message = str(err.value)
    assert message.startswith(f"model.pretrained=true: reading torchvision's weights for "
                              f"resnet18 from {path} failed (")
    assert message.endswith("; delete the file (it is downloaded again) or put a whole copy "
                            "there") and "\n" not in message


def test_a_cache_dir_that_is_a_file_is_one_line_on_the_stream_path(user_code, tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    cfg = load_config(DEFAULT_CONFIG, [
        "data.name=python", f"data.factory={user_code}:good", "data.loader=stream",
        f"data.cache_dir={blocker}", "data.num_workers=0"]).data
    with pytest.raises(UserError) as err:
        build_data(cfg, 0, CPU, 10, 4, False)
    assert str(err.value).startswith(f"writing the training set's statistics into "
                                     f"data.cache_dir {blocker} failed (")
    assert err.value.exit_code == 2 and blocker.read_text() == "not a folder"


def test_evaluating_a_checkpoint_of_another_model_names_both_models(user_code, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(DEFAULT_CONFIG, ["data.synthetic.train_samples=40",
                                       "data.synthetic.test_samples=10", "train.batch_size=8"])
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    data = build_data(cfg.data, 0, CPU, 10, 4, False)
    other = load_config(DEFAULT_CONFIG, [f"model.name=python:{user_code}:small_builder"])
    other_model = build_plain_model(other, CPU, data.facts, False)
    checkpoint = run / "step_00000003.pt"
    torch.save({"classes": {"names": data.facts.classes}, "model": other_model.state_dict(),
                "step": 3, "config": {"model.name": other.model.name}}, checkpoint)
    with pytest.raises(UserError) as err:
        open_trained(cfg, CPU, checkpoint, ema=False)
    message = str(err.value)
    assert message.startswith(f"checkpoint {checkpoint} was written for model "
                              f"{other.model.name} and does not fit model {cfg.model.name}, "
                              f"which the run's config builds: keys ")
    assert "missing" in message and "\n" not in message


def test_a_bug_of_ours_stays_a_traceback():
    def bug():
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        agree(CPU, bug)
    with pytest.raises(ZeroDivisionError), local_main_first(CPU):
        bug()


def test_a_checkpoint_given_to_eval_or_export_is_read_through_the_boundary(tmp_path,
                                                                          monkeypatch):
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError) as err:
        read_checkpoint(damaged)
    assert str(err.value).startswith(f"checkpoint {damaged} cannot be read: ")  # its own line

    def refused(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(Path, "read_bytes", refused)  # root reads any file: planted
    with pytest.raises(UserError) as err:
        read_checkpoint(damaged)
    assert str(err.value) == (f"reading checkpoint {damaged} failed (Permission denied: "
                              f"{damaged})")
    assert err.value.exit_code == 2


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process: meant
def test_convert_names_a_damaged_sharded_file_in_one_line(tmp_path):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "step_00000002"
    dcp.save({"model": {"w": torch.arange(64.0)}}, checkpoint_id=folder, no_dist=True)
    (piece,) = folder.glob("*.distcp")
    piece.write_bytes(bytes(piece.stat().st_size))  # as long as listed, but zeros
    result = run_main(convert_main, str(folder))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: reading the sharded checkpoint {folder} failed (")
    assert result.stderr.endswith("; a file in it is damaged\n") and "Traceback" not in \
        result.stderr
