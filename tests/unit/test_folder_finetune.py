"""Their own images, in this process: `data.val_fraction`'s split (stratified, seeded,
recorded), `checkpoint.keep_best`'s keeper with the checkpoint files, `--checkpoint best`.
The real 2-worker run of all of them together: tests/test_folder_finetune.py."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from common.config import load_config
from common.errors import UserError
from tests.helpers import REPO
from train.after.loaded import checkpoint_path
from train.data import ensure_available
from train.data.val_split import scan_folder, write_split
from train.run.best import BestKeeper
from train.run.checkpoint import Checkpoints, load

CONFIG = REPO / "configs" / "finetune_folder.yaml"


def make_folder(root: Path, sizes: dict[str, int], val: bool = False) -> Path:
    """Empty files named as images: a scan lists names and opens none."""
    for split in ("train", "val") if val else ("train",):
        for name, count in sizes.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                (root / split / name / f"{i:03d}.jpg").touch()
    return root


def data_cfg(root: Path, *overrides: str):
    return load_config(CONFIG, [f"data.root={root}", *overrides]).data


def val_names(val) -> list[str]:
    return sorted(Path(val.paths[i]).relative_to(val.folder).as_posix() for i in range(len(val)))


def test_the_split_is_stratified_seeded_per_class_and_disjoint(tmp_path):
    sizes = {"cat": 20, "dog": 7, "eel": 2}
    root = make_folder(tmp_path / "imgs", sizes)
    train, val = scan_folder(data_cfg(root, "data.val_fraction=0.25"), seed=0)
    per_class = Counter(val.classes[int(label)] for label in val.labels)
    assert per_class == {"cat": 5, "dog": 2, "eel": 1}  # round(n x 0.25), at least one
    assert len(train) + len(val) == sum(sizes.values())
    train_names = {Path(train.paths[i]).relative_to(train.folder).as_posix()
                   for i in range(len(train))}
    assert not train_names & set(val_names(val))
    again = scan_folder(data_cfg(root, "data.val_fraction=0.25"), seed=0)[1]
    assert val_names(again) == val_names(val)
    other = scan_folder(data_cfg(root, "data.val_fraction=0.25"), seed=1)[1]
    assert val_names(other) != val_names(val)
    # A class's split depends on its own files and the seed, not on the other classes.
    (root / "train" / "fox").mkdir()
    for i in range(4):
        (root / "train" / "fox" / f"{i}.jpg").touch()
    grown = scan_folder(data_cfg(root, "data.val_fraction=0.25"), seed=0)[1]
    assert [n for n in val_names(grown) if not n.startswith("fox/")] == val_names(val)


def test_a_recorded_split_is_used_and_its_files_must_stay(tmp_path):
    root = make_folder(tmp_path / "imgs", {"a": 8, "b": 8})
    cfg = data_cfg(root, "data.val_fraction=0.25")
    _, val = scan_folder(cfg, seed=0)
    record = tmp_path / "run" / "val_split.json"
    record.parent.mkdir()
    write_split(record, val, 0.25, 0)
    for i in range(8, 16):  # files added after the run started go to training
        (root / "train" / "a" / f"{i:03d}.jpg").touch()
    assert val_names(scan_folder(cfg, 0, record)[1]) == val_names(val)
    assert val_names(scan_folder(cfg, 0)[1]) != val_names(val)  # computed anew: another one
    # Another run's record (another seed or fraction): computed again, not used.
    assert val_names(scan_folder(cfg, 5, record)[1]) == val_names(scan_folder(cfg, 5)[1])
    Path(val.paths[0]).unlink()
    with pytest.raises(UserError, match=r"val_split.json lists 1 validation file\(s\) that are "
                                        r"no longer in .*; restore them"):
        scan_folder(cfg, 0, record)


@pytest.mark.parametrize("sizes, val, overrides, message", [
    ({"a": 4}, True, ["data.val_fraction=0.2"],
     r"data.val_fraction=0.2 splits validation images off .*train, but .*val exists; set "
     r"data.val_fraction=0"),
    ({"a": 4, "b": 1}, False, ["data.val_fraction=0.2"],
     "class 'b' has 1 image: data.val_fraction=0.2 leaves none for training"),
    ({"a": 20, "b": 3}, False, ["data.val_fraction=0.9"],
     "class 'b' has 3 images: data.val_fraction=0.9 leaves none for training"),
    ({"a": 4}, False, ["data.val_fraction=0"], r"imgs/val does not exist"),
])
def test_contradictory_splits_are_refused_in_one_line(tmp_path, sizes, val, overrides, message):
    root = make_folder(tmp_path / "imgs", sizes, val=val)
    with pytest.raises(UserError, match=message) as info:
        ensure_available(data_cfg(root, *overrides))  # what the launcher checks
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", ["1", "-0.1", "1.5"])
def test_a_fraction_outside_0_1_is_refused_by_the_schema(value):
    with pytest.raises(UserError, match=rf"data.val_fraction must be in \[0, 1\); got {value}"):
        load_config(CONFIG, [f"data.val_fraction={value}"])


def epoch_state(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((2,), float(step))}}


@pytest.mark.parametrize("metric, values, best_step", [
    ("test_accuracy", [0.5, 0.8, 0.7, 0.8], 4),  # max; a tie is no improvement
    ("test_loss", [1.0, 0.6, 0.9, 0.7], 4),
])
def test_the_best_epochs_checkpoint_outlives_rotation_and_resume(tmp_path, metric, values,
                                                                  best_step):
    folder = tmp_path / "checkpoints"
    keeper, files = BestKeeper(metric, "auto", folder), Checkpoints(folder, keep=1)
    files.best = keeper
    for epoch, value in enumerate(values[:3], 1):
        keeper.log_epoch({"epoch": epoch, "step": 2 * epoch, metric: value})
        files.save({**epoch_state(2 * epoch), "best": keeper.state_dict()})
    # Resumed from step 6's checkpoint: the keeper goes on from the best so far (step 4).
    resumed = BestKeeper(metric, "auto", folder)
    resumed.load_state_dict(load(folder / "last.pt")["best"])
    files.best = resumed
    resumed.log_epoch({"epoch": 4, "step": 8, metric: values[3]})
    files.save({**epoch_state(8), "best": resumed.state_dict()})
    steps = sorted(p.name for p in folder.glob("step_*.pt"))
    assert steps == [f"step_{best_step:08d}.pt", "step_00000008.pt"]  # keep=1, and the best
    assert (folder / "best.pt").samefile(folder / f"step_{best_step:08d}.pt")
    assert load(folder / "best.pt")["model"]["w"][0] == best_step
    record = json.loads((folder / "best.json").read_text())
    assert (record["step"], record["value"]) == (best_step, values[best_step // 2 - 1])


def test_checkpoint_best_names_best_pt_and_needs_one(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    assert checkpoint_path(tmp_path, None) == tmp_path / "checkpoints" / "last.pt"
    assert checkpoint_path(tmp_path, "some/file.pt") == Path("some/file.pt")
    with pytest.raises(UserError, match="has no best checkpoint .* checkpoint.keep_best"):
        checkpoint_path(tmp_path, "best")
    (tmp_path / "checkpoints" / "best.pt").touch()
    assert checkpoint_path(tmp_path, "best") == tmp_path / "checkpoints" / "best.pt"
