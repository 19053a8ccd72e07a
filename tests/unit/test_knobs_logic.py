"""The speed knobs' pure rules, in one process: when perf.compile=auto compiles, how
optim.scale_lr scales the rate. (The knobs in real runs: tests/test_knobs.py.)"""

import pytest

from common.schema import OptimConfig
from tests.helpers import REPO
from train.lr import peak_lr

CONFIG = str(REPO / "configs" / "default.yaml")


def test_compile_auto_follows_the_run_length():
    from train.config import load_config
    from train.model import should_compile

    cfg = load_config(CONFIG)
    assert should_compile(cfg, 5000) and not should_compile(cfg, 500)
    cfg.perf.compile = "off"
    assert not should_compile(cfg, 10**6)
    cfg.perf.compile, cfg.mode = "auto", "dp"
    assert not should_compile(cfg, 10**6)  # DataParallel's replicate breaks compiled modules


def test_lr_scaling_rules():
    cfg = OptimConfig(lr=0.1)
    assert peak_lr(cfg, 4, 256) == pytest.approx(0.1)
    cfg.scale_lr = "linear"
    assert peak_lr(cfg, 4, 256) == pytest.approx(0.4)
    cfg.scale_lr = "sqrt"
    assert peak_lr(cfg, 4, 256) == pytest.approx(0.2)
