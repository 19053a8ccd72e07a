"""Where a run lives: the default folder's fingerprint, `run.dir` settled, `runs/latest`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from common.errors import UserError
from common.schema import Config
from tests.helpers import REPO
from train.config import load_config
from train.run.location import LATEST, fingerprint, follow_latest, point_latest, settle_run_dir

CONFIG = str(REPO / "configs" / "default.yaml")

# configs/default.yaml's fingerprint, as computed when the rule last changed (the worker count
# and data.root left it; launch/related_runs.py points a resubmitted job at a folder named by
# the old rule): a change of this value renames every default folder, and runs stop resuming
# (fix the code).
DEFAULT_FINGERPRINT = "0cfaa6f2"


def test_key_order_and_explicit_defaults_do_not_change_it(tmp_path):
    shuffled = tmp_path / "default.yaml"  # the same settings, sections and keys reversed
    import yaml

    raw = yaml.safe_load(Path(CONFIG).read_text())
    reverse = {k: (dict(reversed(v.items())) if isinstance(v, dict) else v)
               for k, v in reversed(raw.items())}
    shuffled.write_text(yaml.safe_dump(reverse, sort_keys=False))
    assert fingerprint(load_config(shuffled)) == DEFAULT_FINGERPRINT
    # A key written out at its schema default is the same run as one left out.
    assert fingerprint(load_config(CONFIG, ["optim.nesterov=false"])) == \
        DEFAULT_FINGERPRINT


@pytest.mark.parametrize("override", ["log.every_steps=3", "wandb.mode=disabled",
                                      "dist.cpu_threads=1", "checkpoint.keep=5",
                                      "run.name=other", "log.sync_probe=false",
                                      "data.download=false", "data.on_device=false"])
def test_runtime_keys_do_not_change_it(override):
    assert fingerprint(load_config(CONFIG, [override])) == DEFAULT_FINGERPRINT


@pytest.mark.parametrize("override", ["train.epochs=1", "optim.lr=0.05", "mode=scratch",
                                      "data.synthetic.train_samples=1000", "seed=1"])
def test_what_a_run_computes_changes_it(override):
    assert fingerprint(load_config(CONFIG, [override])) != DEFAULT_FINGERPRINT


def test_the_worker_count_changes_it_only_where_it_changes_the_run(tmp_path, monkeypatch):
    # The global batch is the same on any worker count (an elastic range too): the same run,
    # the same folder, as the launcher plans it.
    from launch.cli import parse_args
    from launch.job import plan_job

    monkeypatch.chdir(tmp_path)

    def folder(flags: list[str], *overrides: str) -> str:
        return plan_job(parse_args(["--cpu", *flags, CONFIG, *overrides]), dry=True).cfg.run.dir

    plain = {folder(["--gpus", n]) for n in ("1", "2", "3")}
    assert plain | {folder(["--gpus", "2", "--nnodes", "1:3"])} == {
        f"runs/default-{DEFAULT_FINGERPRINT}"}
    # lr x global batch / 256: the same on any worker count, another run than the default's
    scaled = {folder(["--gpus", n], "optim.scale_lr=linear") for n in ("1", "3")}
    assert len(scaled) == 1 and scaled != plain


def test_a_run_is_named_after_the_model_and_data_it_trains_when_overrides_change_them():
    trained = ["model.name=torchvision.resnet18", "data.name=imagefolder", "data.root=img"]
    cfg = load_config(CONFIG, trained)
    assert cfg.run.name == "default-resnet18-imagefolder"
    settle_run_dir(cfg)
    assert re.fullmatch(r"runs/default-resnet18-imagefolder-[0-9a-f]{8}", cfg.run.dir)
    assert cfg.run.dir.endswith(fingerprint(load_config(CONFIG, trained)))  # hash kept
    assert load_config(CONFIG, ["model.name=resnet18"]).run.name == "default-resnet18-synthetic"
    # the config's own model and data, or other keys changed: the config's name alone
    same = [f"model.name={cfg_model()}", "data.name=synthetic", "train.epochs=1"]
    assert load_config(CONFIG, same).run.name == "default"
    assert load_config(CONFIG, [*trained, "run.name=exp"]).run.name == "exp"


def cfg_model() -> str:
    return load_config(CONFIG).model.name


def test_settle_names_the_default_folder_and_keeps_an_explicit_one():
    cfg = load_config(CONFIG)
    assert (cfg.run.name, cfg.run.dir) == ("default", "")
    settle_run_dir(cfg)
    assert cfg.run.dir == str(Path("runs") / f"default-{DEFAULT_FINGERPRINT}")
    settle_run_dir(cfg)  # idempotent
    assert cfg.run.dir == str(Path("runs") / f"default-{DEFAULT_FINGERPRINT}")
    named = load_config(CONFIG, ["run.name=exp"])
    settle_run_dir(named)
    assert named.run.dir == str(Path("runs") / f"exp-{DEFAULT_FINGERPRINT}")
    explicit = load_config(CONFIG, ["run.dir=/x/try1"])
    settle_run_dir(explicit)
    assert (explicit.run.dir, explicit.run.name) == ("/x/try1", "try1")


def test_allow_changes_needs_a_named_folder():
    cfg = load_config(CONFIG, ["checkpoint.allow_changes=true"])
    with pytest.raises(UserError, match="name its folder with run.dir=.*runs/latest"):
        settle_run_dir(cfg)
    explicit = load_config(CONFIG, ["checkpoint.allow_changes=true", "run.dir=runs/a"])
    settle_run_dir(explicit)
    assert explicit.run.dir == "runs/a"


def test_runs_latest_is_followed_to_the_run_it_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "default-1234abcd").mkdir(parents=True)
    point_latest(Path("runs") / "default-1234abcd")
    assert os.readlink(tmp_path / "runs" / LATEST) == "default-1234abcd"  # relative
    cfg = load_config(CONFIG, ["run.dir=runs/latest"])
    settle_run_dir(cfg)
    assert (cfg.run.dir, cfg.run.name) == (str(Path("runs") / "default-1234abcd"),
                                           "default-1234abcd")


def test_without_symbolic_links_latest_is_a_file_that_tools_read(tmp_path, monkeypatch):
    """File systems without links (FAT, some shares) cannot be mounted here: os.symlink fails
    as it does there."""
    monkeypatch.chdir(tmp_path)
    run = Path("runs") / "default-1234abcd"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps(
        {"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5, "test_accuracy": 0.5}) + "\n")

    def no_links(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "symlink", no_links)
    point_latest(run)
    latest = tmp_path / "runs" / LATEST
    assert latest.is_file() and not latest.is_symlink()
    assert latest.read_text() == "default-1234abcd\n"
    assert follow_latest(Path("runs/latest")) == run
    from tools.plot import load_run

    assert load_run("runs/latest").path == run


def test_latest_is_only_kept_in_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere" / "x").mkdir(parents=True)
    point_latest(Path("elsewhere") / "x")
    assert not (tmp_path / "elsewhere" / LATEST).exists()


def test_a_folder_in_the_way_is_a_warning_not_a_failure(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / LATEST / "something").mkdir(parents=True)  # a real folder, not a link
    (tmp_path / "runs" / "a").mkdir()
    point_latest(Path("runs") / "a")
    assert (tmp_path / "runs" / LATEST / "something").is_dir()
    assert "could not point" in caplog.text
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["a", LATEST]  # no debris


def test_the_schema_default_is_the_reference(tmp_path):
    # An empty config is the schema's defaults: nothing differs from them.
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert fingerprint(load_config(empty)) == fingerprint(Config())
