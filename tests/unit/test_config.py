from pathlib import Path

import pytest
import yaml

from common.config import Config, apply_override, to_yaml
from common.errors import UserError
from common.validate import check_world_size
from tests.helpers import REPO
from train.config import load_config
from train.run.identity import describe_differences, identity

DEFAULT = REPO / "configs" / "default.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_load_with_the_book_settings():
    names = {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert {"default.yaml", "lenet_fashion_mnist.yaml", "resnet18_fashion_mnist.yaml",
            "resnet18_cifar10.yaml"} <= names
    for path in (REPO / "configs").glob("*.yaml"):
        load_config(path)
    lenet = load_config(REPO / "configs" / "lenet_fashion_mnist.yaml")
    assert (lenet.model.name, lenet.data.name) == ("lenet", "fashion_mnist")
    assert (lenet.train.batch_size, lenet.optim.lr, lenet.train.epochs) == (256, 0.2, 10)
    resnet = load_config(REPO / "configs" / "resnet18_fashion_mnist.yaml")
    assert (resnet.model.name, resnet.train.batch_size, resnet.optim.lr, resnet.train.epochs) == (
        "resnet18", 256, 0.1, 10)
    assert load_config(REPO / "configs" / "resnet18_cifar10.yaml").data.name == "cifar10"


def test_default_config_is_lenet_on_synthetic_data_with_ddp():
    cfg = load_config(DEFAULT)
    assert (cfg.mode, cfg.model.name, cfg.data.name, cfg.wandb.mode) == (
        "ddp", "lenet", "synthetic", "auto")


def test_overrides_are_typed_and_nested():
    cfg = load_config(DEFAULT, ["train.epochs=3", "optim.lr=1", "train.max_steps=7",
                                "data.synthetic.channels=3", "data.on_device=false",
                                "wandb.tags=[a, b]", "run.name=2024", "seed=5"])
    assert cfg.train.epochs == 3
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps == 7
    assert cfg.data.synthetic.channels == 3
    assert cfg.data.on_device is False
    assert cfg.wandb.tags == ["a", "b"]
    assert cfg.run.name == "2024"  # a string key keeps the text as written
    assert cfg.seed == 5


def test_optional_keys_accept_null():
    cfg = load_config(DEFAULT, ["train.max_steps=5"])
    apply_override(cfg, "train.max_steps=null")
    assert cfg.train.max_steps is None


def test_run_name_defaults_from_the_config_file_and_dir_waits_for_the_worker_count(tmp_path):
    from train.run.location import fingerprint, settle_run_dir

    cfg = load_config(write(tmp_path, "train:\n  epochs: 2\n"))
    assert (cfg.run.name, cfg.run.dir) == ("exp", "")
    settle_run_dir(cfg)
    assert cfg.run.dir == str(Path("runs") / f"exp-{fingerprint(cfg)}")
    explicit = load_config(DEFAULT, ["run.dir=/x/y"])
    assert explicit.run.dir == "/x/y"
    settle_run_dir(explicit)
    assert (explicit.run.dir, explicit.run.name) == ("/x/y", "y")


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown key 'train.epoch' (did you mean train.epochs?)"),
    ("trian.epochs=3", "unknown key 'trian'"),
    ("train.epochs=abc", "train.epochs expects an integer; got 'abc'"),
    ("train.epochs=2.5", "train.epochs expects an integer"),
    ("optim.lr=fast", "optim.lr expects a number"),
    ("data.on_device=maybe", "data.on_device expects true/false"),
    ("optim.schedule=linear", "optim.schedule must be one of constant, cosine, step; got 'linear'"),
    ("train=3", "train is a section"),
    ("train.epochs.x=3", "train.epochs is a value, not a section"),
    ("train.epochs", "not of the form key=value"),
    ("train.epochs=0", "train.epochs must be positive"),
    ("optim.momentum=-0.1", "optim.momentum must not be negative"),
    ("model.name=vgg", "model.name='vgg' is not a model; did you mean torchvision.vgg19, "
                       "torchvision.vgg16"),
    ("model.name=torchvision.resnet5", "did you mean torchvision.resnet50"),
    ("model.name=timm.resnet50", "model.name=timm.resnet50 needs timm, which is not installed"),
    ("model.name=python:no_such_module:build", "cannot import no_such_module"),
    ("optim.name=adam", "optim.name='adam' is not an optimizer: sgd or adamw; did you mean "
                        "adamw?"),
    ("optim.clip_grad_norm=0", "optim.clip_grad_norm must be positive"),
    ("optim.clip_grad_norm=-1", "optim.clip_grad_norm must be positive"),
    ("train.label_smoothing=1", "train.label_smoothing must be in [0, 1)"),
    ("train.label_smoothing=-0.1", "train.label_smoothing must be in [0, 1)"),
    ("train.ema_decay=1", "train.ema_decay must be in (0, 1)"),
    ("train.ema_decay=0", "train.ema_decay must be in (0, 1)"),
    # torch's PowerSGD raised a ValueError at DDP's construction (found by tests/test_matrix.py)
    ("ddp.powersgd_start_step=1", "ddp.powersgd_start_step must be at least 2 (torch's PowerSGD "
                                  "compresses from DDP's third iteration)"),
    ("optim.milestones=[5,2]", "optim.milestones must be increasing positive epochs"),
    ("data.name=imagenet", "data.name 'imagenet' is unknown"),
    ("wandb.tags=a", "wandb.tags expects a list"),
    ("scratch.bucket_mb=.nan", "scratch.bucket_mb expects a finite number"),
    ("optim.lr=.inf", "optim.lr expects a finite number"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(UserError, match=None) as info:
        load_config(DEFAULT, [override])
    assert message in str(info.value)


def test_yaml_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(UserError, match="exp.yaml: unknown key 'train.batchsize'"):
        load_config(write(tmp_path, "train:\n  batchsize: 3\n"))
    with pytest.raises(UserError, match="exp.yaml: train.epochs expects an integer"):
        load_config(write(tmp_path, "train:\n  epochs: many\n"))
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [\n"))
    with pytest.raises(UserError, match="exp.yaml: train must be a section"):
        load_config(write(tmp_path, "train: 5\n"))
    with pytest.raises(UserError, match="config file not found: .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_global_batch_must_split_evenly():
    cfg = load_config(DEFAULT, ["train.batch_size=256"])
    check_world_size(cfg, 2)
    with pytest.raises(UserError, match="not divisible by 3 workers"):
        check_world_size(cfg, 3)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(DEFAULT, ["train.epochs=4", "wandb.tags=[x]"])
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg))
    again = load_config(saved)
    assert identity(again) == identity(cfg)
    assert yaml.safe_load(saved.read_text())["train"]["epochs"] == 4


def test_differences_are_named():
    a, b = identity(Config()), identity(load_config(DEFAULT, ["train.epochs=9"]))
    assert "train.epochs" in describe_differences(a, b)
    assert "9" in describe_differences(a, b)
    # Keys that do not change what is computed are not part of a run's identity.
    assert identity(load_config(DEFAULT, ["run.overwrite=true"])) == identity(load_config(DEFAULT))


def test_a_run_recorded_before_a_key_existed_is_the_same_run():
    # Checkpoints and run folders written by an older version lack the keys added since:
    # a missing key counts as its default, so those runs still resume.
    cfg = load_config(DEFAULT)
    older = {k: v for k, v in identity(cfg).items() if k != "optim.nesterov"}
    assert describe_differences(older, identity(cfg)) == ""
    changed = load_config(DEFAULT, ["optim.nesterov=true"])
    assert "optim.nesterov" in describe_differences(older, identity(changed))


def test_constraints_live_beside_their_keys():
    from common.config import runtime_keys

    with pytest.raises(UserError, match="data.synthetic.image_size must be at least 16"):
        load_config(DEFAULT, ["data.synthetic.image_size=8"])
    with pytest.raises(UserError, match="train.max_steps must be positive; got 0"):
        load_config(DEFAULT, ["train.max_steps=0"])
    assert "dist.timeout_s" in runtime_keys() and "optim.lr" not in runtime_keys()
