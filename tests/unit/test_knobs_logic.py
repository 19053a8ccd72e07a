"""The speed knobs' pure rules, in one process: when perf.compile=auto compiles, how
optim.scale_lr scales the rate by the global batch. (The knobs in real runs:
tests/test_knobs.py.)"""

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


@pytest.mark.parametrize("scale_lr, base, batch, expected", [
    ("none", None, 1024, 0.1),  # as given
    ("linear", None, 1024, 0.4),  # x 1024 / 256 (the default base batch, timm's)
    ("linear", None, 128, 0.05),
    ("sqrt", None, 1024, 0.2),  # x sqrt(1024 / 256)
    ("linear", 512, 1024, 0.2),  # x 1024 / 512
    ("sqrt", 64, 1024, 0.4),  # x sqrt(1024 / 64)
    ("none", 512, 1024, 0.2),  # lr_base_batch alone: the linear rule
])
def test_lr_scaling_follows_the_global_batch(scale_lr, base, batch, expected):
    cfg = OptimConfig(lr=0.1, scale_lr=scale_lr, lr_base_batch=base)
    assert peak_lr(cfg, batch) == pytest.approx(expected)

