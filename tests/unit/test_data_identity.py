"""A run's identity follows the data, not its path (train/run/data_identity.py), and the worker
count only where it changes the run (train/run/identity.py); a job about to start a new folder
beside a run of the same config says so in one line (launch/related_runs.py)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest

from common.errors import UserError
from launch.cli import parse_args
from launch.plan import make_plan
from launch.related_runs import related_notice
from tests.helpers import REPO
from train.config import load_config
from train.run.checkpoint import Checkpoints
from train.run.data_identity import CONTENT_KEY
from train.run.identity import check_resumable, differences, identity
from train.run.location import fingerprint, settle_run_dir

CONFIG = str(REPO / "configs" / "default.yaml")
FOLDER = ["data.name=imagefolder", "model.name=torchvision.resnet18"]


def image_folder(root: Path) -> Path:
    """Two classes of files named like images (nothing here opens them)."""
    for split, count in (("train", 2), ("val", 1)):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                (root / split / name / f"{i}.jpg").write_bytes(b"x" * (100 + i))
    return root


def folder_config(root: str | Path, *extra: str):
    return load_config(CONFIG, [*FOLDER, f"data.root={root}", *extra])


def test_a_relative_or_absolute_path_or_a_copy_is_the_same_data(tmp_path, monkeypatch):
    image_folder(tmp_path / "data" / "pets")
    copy = shutil.copytree(tmp_path / "data" / "pets", tmp_path / "node-local" / "pets")
    monkeypatch.chdir(tmp_path)
    spellings = ["data/pets", str(tmp_path / "data" / "pets"), "./data/../data/pets", copy]
    found = [identity(folder_config(root)) for root in spellings]
    assert all(f == found[0] for f in found)
    assert "data.root" not in found[0]
    # 2 x (100 + 101) bytes in train, 2 x 100 in val
    assert found[0][CONTENT_KEY].startswith("train 4 / val 2 files in 2 classes, 602 bytes")
    assert len({fingerprint(folder_config(root)) for root in spellings}) == 1


def test_a_file_added_removed_or_renamed_is_other_data(tmp_path):
    root = image_folder(tmp_path / "pets")
    before = identity(folder_config(root))
    (root / "train" / "cat" / "2.jpg").write_bytes(b"y")
    added = identity(folder_config(root))
    assert differences(before, added) == [CONTENT_KEY]
    assert fingerprint(folder_config(root)) != fingerprint(load_config(
        CONFIG, [*FOLDER, f"data.root={tmp_path / 'other'}"]))
    (root / "train" / "cat" / "2.jpg").unlink()
    assert identity(folder_config(root)) == before
    (root / "train" / "cat" / "1.jpg").rename(root / "train" / "cat" / "9.jpg")
    assert differences(before, identity(folder_config(root))) == [CONTENT_KEY]
    (root / "train" / "cat" / "9.jpg").rename(root / "train" / "cat" / "1.jpg")
    (root / "train" / "cat" / "notes.txt").write_text("not an image: the dataset skips it")
    assert identity(folder_config(root)) == before


def test_a_missing_folder_has_an_identity_and_the_data_check_says_why(tmp_path):
    content = identity(folder_config(tmp_path / "nowhere"))[CONTENT_KEY]
    assert content.startswith("train absent / val absent files in 0 classes")


def idx_file(path: Path, dims: tuple[int, ...]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    path.write_bytes(header)  # the header is what the identity reads


def test_idx_files_are_known_by_their_headers_and_missing_ones_as_published(tmp_path,
                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    mnist = ["data.name=fashion_mnist", "data.root=data"]
    missing = identity(load_config(CONFIG, mnist))[CONTENT_KEY]
    assert missing == ("fashion_mnist: train-images 60000x28x28, train-labels 60000, "
                       "t10k-images 10000x28x28, t10k-labels 10000")
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    for name, dims in (("train-images-idx3-ubyte", (60000, 28, 28)),
                       ("train-labels-idx1-ubyte", (60000,)),
                       ("t10k-images-idx3-ubyte", (10000, 28, 28)),
                       ("t10k-labels-idx1-ubyte", (10000,))):
        idx_file(raw / name, dims)
    # Downloaded (the published files) is the same run the launcher named before the download.
    assert identity(load_config(CONFIG, mnist))[CONTENT_KEY] == missing
    idx_file(raw / "train-images-idx3-ubyte", (600, 28, 28))  # a subset: other data
    idx_file(raw / "train-labels-idx1-ubyte", (600,))
    subset = identity(load_config(CONFIG, mnist))
    assert "train-images 600x28x28, train-labels 600" in subset[CONTENT_KEY]
    assert subset == identity(load_config(CONFIG, ["data.name=fashion_mnist",
                                                   f"data.root={tmp_path / 'data'}"]))


def test_cifar_batches_are_known_by_their_counts(tmp_path):
    cifar = ["data.name=cifar10", f"data.root={tmp_path}"]
    assert "data_batch_1 10000" in identity(load_config(CONFIG, cifar))[CONTENT_KEY]
    (tmp_path / "cifar-10-batches-py").mkdir()
    with (tmp_path / "cifar-10-batches-py" / "data_batch_1").open("wb") as f:
        pickle.dump({"data": [[0] * 3072] * 3, "labels": [0, 1, 2]}, f)
    content = identity(load_config(CONFIG, cifar))[CONTENT_KEY]
    assert "data_batch_1 3, data_batch_2 10000" in content


def test_generated_data_is_its_parameters_wherever_data_root_points():
    assert identity(load_config(CONFIG, ["data.root=/a"])) == identity(load_config(CONFIG))
    assert CONTENT_KEY not in identity(load_config(CONFIG))
    assert identity(load_config(CONFIG, ["data.synthetic.train_samples=100"])) != identity(
        load_config(CONFIG))


def test_a_run_recorded_before_data_fingerprints_still_resumes(tmp_path):
    cfg = folder_config(image_folder(tmp_path / "pets"))
    older = {k: v for k, v in identity(cfg).items() if k != CONTENT_KEY}
    older["data.root"] = "somewhere/else"  # part of the identity then
    assert differences(older, identity(cfg)) == []


def test_another_worker_count_continues_even_with_a_scaled_learning_rate():
    # The worker count is in no state the check reads: a checkpoint of 2 continues on 3,
    # re-sharded, mid-epoch included; scale_lr follows the global batch, not the workers.
    for overrides in ([], ["optim.scale_lr=linear"]):
        cfg = load_config(CONFIG, overrides)
        check_resumable(cfg, {"config": identity(cfg), "world_size": 2, "batch_in_epoch": 5},
                        "checkpoint x")
    other = load_config(CONFIG, ["optim.scale_lr=sqrt"])
    with pytest.raises(UserError, match="optim.scale_lr: 'linear' -> 'sqrt'"):
        check_resumable(other, {"config": identity(cfg), "world_size": 2, "batch_in_epoch": 0},
                        "checkpoint x")


def beside(tmp_path: Path, name: str, saved: dict, world_size: int = 2, step: int = 12,
           batch_in_epoch: int = 0, epoch: int = 1) -> Path:
    """A run folder `runs/<name>` with one checkpoint of `saved` (an identity)."""
    folder = tmp_path / "runs" / name
    Checkpoints(folder / "checkpoints", keep=1).save({
        "config": saved, "world_size": world_size, "epoch": epoch, "step": step,
        "batch_in_epoch": batch_in_epoch})
    return folder


def settled(*overrides: str):
    cfg = load_config(CONFIG, list(overrides))
    settle_run_dir(cfg)
    return cfg


def test_a_run_beside_on_another_worker_count_is_named_with_its_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scaled = ["optim.scale_lr=linear"]
    beside(tmp_path, "default-0123abcd", identity(settled(*scaled)))
    notice = related_notice(settled(*scaled), 1, [CONFIG, *scaled])
    assert notice is not None and "\n" not in notice
    assert notice.startswith(f"{settled(*scaled).run.dir} is a new run folder, but "
                             f"runs/default-0123abcd holds a run of this config at step 12 "
                             f"(2 workers -> 1)")
    assert notice.endswith(f"-m launch {CONFIG} optim.scale_lr=linear "
                           f"run.dir=runs/default-0123abcd")
    # Another learning rate is another run: nothing said; so is a folder of another name.
    assert related_notice(settled("optim.lr=0.2"), 1, []) is None
    assert related_notice(settled(*scaled, "run.name=other"), 1, []) is None


def test_a_folder_named_by_the_old_rule_is_found_and_continued_as_it_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = identity(settled())
    old["data.root"] = "data"  # as an older version recorded it
    beside(tmp_path, "default-0dde853e", old, batch_in_epoch=4)
    notice = related_notice(settled(), 2, [CONFIG])
    assert notice is not None
    assert "(the same run, in a folder named by an earlier version)" in notice
    assert notice.endswith(f"{CONFIG} run.dir=runs/default-0dde853e")  # nothing to allow
    assert "(2 workers -> 1)" in related_notice(settled(), 1, [CONFIG])
    # The launcher says it before it starts (and the doctor in its run folder row).
    plan = make_plan(parse_args(["--cpu", "--gpus", "1", CONFIG, "wandb.mode=disabled"]))
    assert len(plan.notes) == 1 and "runs/default-0dde853e" in plan.notes[0]


def test_the_same_config_on_other_files_names_the_change(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = image_folder(tmp_path / "pets")
    before = identity(settled(*FOLDER, f"data.root={root}"))
    (root / "train" / "dog" / "new.jpg").write_bytes(b"z")
    cfg = settled(*FOLDER, f"data.root={root}")
    run = cfg.run.name
    beside(tmp_path, f"{run}-0123abcd", before)
    notice = related_notice(cfg, 1, [])
    assert "(data.content: 'train 4 / val 2 files" in notice
    assert "-> 'train 5 / val 2 files" in notice
    assert notice.endswith("checkpoint.allow_changes=true")
    shutil.rmtree(tmp_path / "runs")
    beside(tmp_path, f"{run}-0123abcd", before, batch_in_epoch=3)  # stopped inside an epoch
    assert "it cannot continue with this config: " in related_notice(cfg, 1, [])
    shutil.rmtree(tmp_path / "runs")
    beside(tmp_path, f"{run}-0123abcd", before, epoch=cfg.train.epochs)  # every epoch done
    done = related_notice(cfg, 1, [])
    assert "holds a complete run of this config (data.content: 'train 4" in done
    assert "run.dir=" not in done  # nothing to continue
