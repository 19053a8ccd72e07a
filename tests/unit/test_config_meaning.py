"""A config that parses but would mean something else is refused, in this process: a key given
twice in a YAML section, keys of a choice the config did not make, a schedule whose warmup or
milestones lie past the run's end, and an online wandb run whose server does not answer."""

from __future__ import annotations

import socket
import time

import pytest

from common.choices import ONLY_FOR, check_chosen_keys
from common.config import load_config
from common.errors import UserError
from common.run_length import check_run_length
from common.schema import WandbConfig
from common.validate import World, validate, validate_with_data
from tests.helpers import REPO
from train.observe import wandb_sink

CONFIG = str(REPO / "configs" / "default.yaml")
CPU2 = World(size=2, device="cpu")


def refused_by(fn, *args) -> str:
    with pytest.raises(UserError) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


# --- a key given twice ------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("train:\n  epochs: 3\n  batch_size: 64\n  epochs: 5\n",
     "key 'epochs' is given twice in one section (lines 2 and 4); keep one"),
    ("data:\n  synthetic:\n    channels: 3\n    channels: 1\n", "(lines 3 and 4)"),
    ("mode: ddp\nseed: 1\nmode: fsdp\n",
     "key 'mode' is given twice in one section (lines 1 and 3)"),
])
def test_a_key_given_twice_in_a_yaml_section_is_refused_naming_both_lines(tmp_path, text,
                                                                          message):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    assert message in refused_by(load_config, path)


def test_the_same_key_in_two_sections_is_two_keys(tmp_path):
    path = tmp_path / "flips.yaml"
    path.write_text("data:\n  imagenet:\n    flip: 0.2\n  cifar:\n    flip: 0.3\n")
    cfg = load_config(path)
    assert (cfg.data.imagenet.flip, cfg.data.cifar.flip) == (0.2, 0.3)


def test_a_key_given_twice_on_the_command_line_takes_the_later_value():
    cfg = load_config(CONFIG, ["train.epochs=3", "train.epochs=5"])
    assert cfg.train.epochs == 5


# --- keys of a choice the config did not make -------------------------------------------------

# (overrides, the refusal's words); one case per rule of common/choices.py at least.
UNREAD = [
    (["optim.name=adamw", "optim.nesterov=true"],
     "optim.nesterov=true applies only to optim.name=sgd; this config has optim.name=adamw"),
    (["optim.name=adamw", "optim.momentum=0.5"], "optim.momentum=0.5 applies only to "
                                                 "optim.name=sgd"),
    (["optim.momentum=0", "optim.nesterov=true"],
     "optim.nesterov=true applies only to optim.momentum > 0; this config has optim.momentum=0"),
    (["optim.betas=[0.8,0.9]"], "optim.betas=[0.8,0.9] applies only to optim.name=adamw; this "
                                "config has optim.name=sgd"),
    (["optim.schedule=constant", "optim.min_lr=0.001"],
     "optim.min_lr=0.001 applies only to optim.schedule=cosine"),
    (["optim.gamma=0.5"], "optim.gamma=0.5 applies only to optim.schedule=step; this config has "
                          "optim.schedule=cosine"),
    (["optim.weight_decay=0", "optim.decay_norm_and_bias=true"],
     "optim.decay_norm_and_bias=true applies only to optim.weight_decay > 0"),
    (["train.ema_warmup=false"], "train.ema_warmup=false applies only to train.ema_decay"),
    (["train.mixup_alpha=0.2", "train.cutmix_prob=0.3"],
     "train.cutmix_prob=0.3 applies only to both train.mixup_alpha and train.cutmix_alpha"),
    (["model.name=torchvision.resnet18", "model.init=book"],
     "model.init=book applies only to the book's models"),
    (["data.imagenet.eval_crop=0.9"], "data.imagenet.eval_crop=0.9 applies only to "
                                      "data.augment=imagenet; this config has data.augment=none"),
    (["data.augment=imagenet", "data.cifar.padding=2"],
     "data.cifar.padding=2 applies only to data.augment=cifar"),
    (["data.imagefolder.val=validation"],
     "data.imagefolder.val=validation applies only to data.name=imagefolder"),
    (["data.factory=my_pkg:build"], "data.factory=my_pkg:build applies only to data.name=python"),
    (["data.loader=memory", "data.memory_gb=8"], "data.memory_gb=8 applies only to "
                                                 "data.loader=auto"),
    (["data.loader=memory", "data.stats_samples=50"],
     "data.stats_samples=50 applies only to the stream loader with data.normalize=true"),
    (["data.loader=memory", "data.cache=decoded"],
     "data.cache=decoded applies only to the stream loader"),
    (["ddp.powersgd_rank=4"], "ddp.powersgd_rank=4 applies only to ddp.comm_hook=powersgd"),
    (["scratch.per_parameter=true", "scratch.bucket_mb=1", "mode=scratch"],
     "scratch.bucket_mb=1 applies only to scratch.per_parameter=false"),
    (["perf.compile=off", "perf.compile_mode=max-autotune"],
     "perf.compile_mode=max-autotune applies only to perf.compile=on or auto"),
    (["perf.compile=on", "perf.compile_min_steps=10"],
     "perf.compile_min_steps=10 applies only to perf.compile=auto"),
]


@pytest.mark.parametrize("overrides, message", UNREAD)
def test_a_key_of_a_choice_not_made_is_refused(overrides, message):
    cfg = load_config(CONFIG, overrides)
    assert message in refused_by(check_chosen_keys, cfg)
    assert message in refused_by(validate, cfg, CPU2)  # the launcher's, doctor's, workers'


def test_every_rule_has_a_case():
    refused = {m.split("=")[0] for _, m in UNREAD}
    for rule in ONLY_FOR:
        assert any(key in refused for key in rule.keys), rule.keys


@pytest.mark.parametrize("overrides", [
    ["optim.name=adamw", "optim.betas=[0.8,0.9]", "optim.eps=1e-6"],
    ["optim.nesterov=true", "optim.momentum=0.5"],
    ["optim.schedule=step", "optim.milestones=[2,4]", "optim.gamma=0.5"],
    ["train.mixup_alpha=0.2", "train.cutmix_alpha=1.0", "train.cutmix_prob=0.3"],
    ["data.augment=cifar", "data.cifar.padding=2"],
    ["ddp.comm_hook=powersgd", "ddp.powersgd_rank=4"],
    ["perf.compile=on", "perf.compile_backend=aot_eager"],
    ["optim.name=adamw", "optim.momentum=0.9"],  # the default: a key left as it is, not set
])
def test_the_same_keys_under_the_choice_that_reads_them_pass(overrides):
    check_chosen_keys(load_config(CONFIG, overrides))


@pytest.mark.parametrize("overrides, message", [
    (["mode=scratch", "ddp.bucket_cap_mb=5"],
     "ddp.bucket_cap_mb=5.0 applies to mode ddp only (mode is scratch)"),
    (["mode=dp", "ddp.find_unused_parameters=true"],
     "ddp.find_unused_parameters=true applies to mode ddp only (mode is dp)"),
    (["scratch.algorithm=naive"], "scratch.algorithm=naive applies to mode scratch only (mode "
                                  "is ddp)"),
])
def test_another_modes_section_is_refused_in_every_mode(overrides, message):
    assert message in refused_by(validate, load_config(CONFIG, overrides), CPU2)


@pytest.mark.parametrize("overrides, world, message", [
    (["optim.min_lr=0.1"], CPU2, "optim.min_lr=0.1 is not below the peak learning rate 0.1 "
                                 "(optim.lr=0.1, scaled): the cosine would rise"),
    (["optim.min_lr=0.15", "optim.scale_lr=linear"], CPU2, None),  # the peak: 0.2
    (["optim.min_lr=0.15", "optim.lr_base_batch=512"], CPU2, "the peak learning rate 0.05"),
    (["optim.min_lr=0.5", "optim.schedule=constant"], CPU2, "applies only to "
                                                            "optim.schedule=cosine"),
])
def test_a_cosine_floor_at_or_above_its_peak_is_refused(overrides, world, message):
    cfg = load_config(CONFIG, overrides)
    if message is None:
        validate(cfg, world)
    else:
        assert message in refused_by(validate, cfg, world)


def test_the_shipped_configs_set_no_key_they_do_not_read():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        check_chosen_keys(load_config(path))


# --- the schedule against the run's length ----------------------------------------------------


def test_a_warmup_that_does_not_end_before_the_run_is_refused_naming_its_length():
    cfg = load_config(CONFIG, ["optim.warmup_epochs=0", "optim.warmup_steps=20",
                               "train.epochs=2"])
    assert ("optim.warmup_steps=20 does not end before the run does: the run has 16 optimizer "
            "steps (2 epoch(s) of 8 steps)") in refused_by(validate_with_data, cfg, 10, 16, 8)
    assert validate_with_data(cfg, 10, 22, 11) == []  # 22 steps: the warmup ends inside
    epochs = load_config(CONFIG, ["optim.warmup_epochs=1.5", "train.epochs=1",
                                  "data.name=cifar10"])
    assert "optim.warmup_epochs=1.5 does not end before the run does (train.epochs=1)" in \
        refused_by(validate, epochs, CPU2)  # in epochs: known before the data
    # 1.95 epochs of 8 steps round to 16: the whole run
    assert "optim.warmup_epochs=1.95 (16 steps) does not end" in refused_by(
        check_run_length, load_config(CONFIG, ["optim.warmup_epochs=1.95", "train.epochs=2"]), 8)


def test_milestones_at_or_past_the_last_epoch_are_refused():
    cfg = load_config(CONFIG, ["optim.schedule=step", "data.name=cifar10", "train.epochs=4"])
    assert ("optim.milestones=[30,60,80]: 30, 60, 80 lie at or beyond the run's end (a "
            "milestone m lowers the lr after m epochs; the run has 4 epoch(s)); choose "
            "milestones below 4") in refused_by(validate, cfg, CPU2)
    late = load_config(CONFIG, ["optim.schedule=step", "optim.milestones=[2,4]",
                                "train.epochs=4"])
    assert "4 lie at or beyond the run's end" in refused_by(validate_with_data, late, 10, 40, 10)
    fits = load_config(CONFIG, ["optim.schedule=step", "optim.milestones=[2,3]",
                                "train.epochs=4"])
    assert validate_with_data(fits, 10, 40, 10) == []


def test_powersgd_that_would_start_after_the_run_is_refused():
    cfg = load_config(CONFIG, ["ddp.comm_hook=powersgd", "ddp.powersgd_start_step=16"])
    assert ("ddp.powersgd_start_step=16 is at or past the run's end: the run has 16 optimizer "
            "steps (2 epoch(s) of 8 steps); PowerSGD (from step 17) would never compress") in \
        refused_by(check_run_length, load_config(CONFIG, [
            "ddp.comm_hook=powersgd", "ddp.powersgd_start_step=16", "train.epochs=2"]), 8)
    assert validate_with_data(cfg, 10, 558, 93) == []  # 6 epochs of 93 steps: it starts
    short = load_config(CONFIG, ["ddp.comm_hook=powersgd", "ddp.powersgd_start_step=16",
                                 "train.max_steps=10"])
    assert "train.max_steps=10 ends the run before PowerSGD starts " \
           "(ddp.powersgd_start_step=16)" in validate_with_data(short, 10, 10, 93)


def test_synthetic_data_is_checked_before_any_worker_starts():
    cfg = load_config(CONFIG, ["data.synthetic.train_samples=768", "train.batch_size=128",
                               "train.epochs=1", "optim.warmup_epochs=0",
                               "optim.warmup_steps=20"])
    assert "the run has 6 optimizer steps (1 epoch(s) of 6 steps)" in refused_by(
        validate, cfg, CPU2, ["schedule"])


def test_max_steps_beyond_the_run_is_a_warning_that_it_stops_nothing():
    cfg = load_config(CONFIG, ["train.max_steps=1000", "train.epochs=2"])
    assert validate_with_data(cfg, 10, 186, 93) == [
        "train.max_steps=1000 is beyond the run's end: it has 186 optimizer steps (2 epoch(s) "
        "of 93); train.epochs ends it"]


def test_max_steps_that_cut_the_run_short_are_warnings_not_errors():
    cfg = load_config(CONFIG, ["train.max_steps=3", "optim.schedule=step",
                               "optim.milestones=[1,2]", "train.epochs=3"])
    assert validate(cfg, CPU2) == []  # a smoke run: said once, by the worker with the data
    assert validate_with_data(cfg, 10, 3, 93) == [
        "train.max_steps=3 ends the run inside the warmup (20 steps): the learning rate never "
        "reaches optim.lr",
        "train.max_steps=3 ends the run before optim.milestones 1, 2 (epochs of 93 steps)"]


# --- wandb online without an answering server -------------------------------------------------


@pytest.fixture()
def online(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    wandb_sink.unreachable.cache_clear()
    yield monkeypatch
    wandb_sink.unreachable.cache_clear()


def _closed_port() -> int:
    with socket.socket() as s:  # bound and closed again: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_online_run_whose_server_refuses_is_refused_in_seconds(online):
    url = f"http://127.0.0.1:{_closed_port()}"
    online.setenv("WANDB_BASE_URL", url)
    started = time.monotonic()
    message = refused_by(wandb_sink.check_usable, WandbConfig(mode="online"))
    assert time.monotonic() - started < 15
    assert f"wandb.mode=online but the wandb server {url} cannot be reached" in message
    assert "run with wandb.mode=offline" in message
    mode, why = wandb_sink.resolve_mode(WandbConfig(mode="auto"))  # auto: offline instead
    assert mode == "offline" and "cannot be reached" in why
    wandb_sink.check_usable(WandbConfig(mode="auto"))


def test_a_server_that_takes_the_connection_but_never_answers_is_unreachable(online):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # the kernel accepts; nobody answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        assert wandb_sink.unreachable(url, 0.5) == "no answer within 0.5 s" or \
            "timed out" in wandb_sink.unreachable(url, 0.5)
        assert time.monotonic() - started < 5
