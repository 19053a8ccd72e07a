"""Optimizers (SGD, AdamW and their parameter groups, fused/foreach), the lr's rules and
schedules (warmup in steps or epochs, constant, cosine, step), clipping's norm."""


import pytest
import torch
from torch import nn

from common.errors import UserError
from common.schema import OptimConfig
from common.validate import check_lr_options
from models import build_model
from tests.helpers import REPO
from train.lr import LrPlan, peak_lr
from train.optim import build_optimization, make_optimizer, param_groups


def test_adamw_decays_weights_but_not_biases_or_norm_layers_by_default():
    net = build_model("resnet18", 3, 10, 32)
    groups = param_groups(OptimConfig(name="adamw", weight_decay=0.05), net)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert id(net[0].weight) in decayed and id(net[0].bias) not in decayed  # conv, its bias
    assert id(net[1].weight) not in decayed  # batch norm's scale
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(net.parameters()))
    assert len(param_groups(OptimConfig(name="adamw", decay_norm_and_bias=True), net)) == 1
    assert len(param_groups(OptimConfig(name="sgd"), net)) == 1  # SGD: as before


def test_adamw_gets_its_betas_eps_and_implementation():
    net = nn.Linear(4, 3)
    cfg = OptimConfig(name="adamw", betas=[0.8, 0.95], eps=1e-6, implementation="fused")
    opt = make_optimizer(cfg, net, 0.01, "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6 and group["fused"]
    sgd = make_optimizer(OptimConfig(implementation="foreach"), net, 0.1, "cpu")
    assert sgd.param_groups[0]["foreach"] and not sgd.param_groups[0]["fused"]
    auto = make_optimizer(OptimConfig(name="adamw"), net, 0.1, "cpu")
    assert not auto.param_groups[0]["fused"]  # auto: fused on GPUs only
    with pytest.raises(UserError, match="did you mean adamw"):
        make_optimizer(OptimConfig(name="adam"), net, 0.1, "cpu")


def test_warmup_in_epochs_then_step_decay_at_milestones():
    cfg = OptimConfig(lr=1.0, schedule="step", warmup_epochs=0.5, milestones=[2, 3], gamma=0.1)
    plan = LrPlan.of(cfg, 1.0, total=40, steps_per_epoch=10)
    assert [plan(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert plan(19) == 1.0 and plan(20) == pytest.approx(0.1) and plan(30) == pytest.approx(0.01)
    cosine = LrPlan.of(OptimConfig(lr=1.0, warmup_steps=2, min_lr=0.1), 1.0, 12, 4)
    assert cosine(2) == pytest.approx(1.0) and cosine(12) == pytest.approx(0.1)


def test_the_scheduler_follows_the_plan_and_lr_base_batch_scales_the_peak():
    cfg = OptimConfig(lr=0.5, lr_base_batch=256, schedule="constant", warmup_steps=2)
    assert peak_lr(cfg, global_batch=1024) == pytest.approx(2.0)
    optim = build_optimization(cfg, "fp32", nn.Linear(2, 2), 1024, 10, 5, "cpu")
    lrs = []
    for _ in range(3):
        lrs.append(optim.lr)
        optim.optimizer.step()
        optim.scheduler.step()
    assert lrs == pytest.approx([1.0, 2.0, 2.0])
    # the plan is not saved: a resume under checkpoint.allow_changes follows the new one
    assert optim.scheduler.state_dict()["lr_lambdas"] == [{}]


@pytest.mark.parametrize("cfg, message", [
    (OptimConfig(warmup_steps=5, warmup_epochs=1), "both set the warmup"),
])
def test_contradicting_lr_options_are_one_line(cfg, message):
    with pytest.raises(UserError, match=message):
        check_lr_options(cfg)


def test_clipping_returns_the_norm_before_clipping_and_clips_to_the_threshold():
    net = nn.Linear(3, 1, bias=False)
    optim = build_optimization(OptimConfig(lr=1.0, momentum=0, weight_decay=0,
                                           clip_grad_norm=0.5, schedule="constant"),
                               "fp32", net, 1, 10, 10, "cpu")
    net.weight.grad = torch.tensor([[3.0, 4.0, 0.0]])
    before = net.weight.detach().clone()
    norm = optim.step()
    assert norm.item() == pytest.approx(5.0)
    assert (before - net.weight.detach()).norm().item() == pytest.approx(0.5)


def test_under_fp16_the_norm_is_taken_after_unscaling():
    net = nn.Linear(3, 1, bias=False)
    optim = build_optimization(OptimConfig(lr=1.0, momentum=0, weight_decay=0,
                                           clip_grad_norm=100.0, schedule="constant"),
                               "fp16", net, 1, 10, 10, "cpu")
    assert optim.scaler.is_enabled() and optim.scaler.get_scale() > 1000
    x = torch.tensor([[3.0, 4.0, 0.0]])
    optim.backward(net(x).sum())  # scaled by 65536
    norm = optim.step()
    assert norm.item() == pytest.approx(5.0)  # true units: not clipped at 100 after scaling


def test_mixing_pairs_are_the_same_on_one_process_and_on_workers():
    from common.schema import TrainConfig
    from train.loop.regularize import Mixing

    mixing = Mixing(TrainConfig(mixup_alpha=0.4, cutmix_alpha=1.0), seed=3)
    images = torch.randn(12, 1, 8, 8)
    labels = torch.arange(12)
    for step in range(6):
        whole, pairs, lam = mixing(images, labels, step)
        for world in (2, 3):  # rank r holds every world-th sample (DistributedSampler)
            for rank in range(world):
                part, part_pairs, part_lam = mixing(images[rank::world], labels[rank::world], step)
                assert part_lam == lam
                assert torch.equal(part, whole[rank::world])
                assert torch.equal(part_pairs, pairs[rank::world])
    assert len({mixing(images, labels, s)[2] for s in range(6)}) == 6  # a factor per step


def test_ema_warms_up_and_averages():
    from train.loop.regularize import ModelEma

    net = nn.Linear(1, 1, bias=False)
    net.weight.data.fill_(0.0)
    ema = ModelEma(net, decay=0.99, warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    net.weight.data.fill_(1.0)
    ema.update(net)
    assert ema.module.weight.item() == pytest.approx(0.9)
    for _ in range(2000):
        ema.update(net)
    assert ema.current_decay() == 0.99 and ema.module.weight.item() == pytest.approx(1.0)


@pytest.mark.parametrize("name, implementation, mode, device, picked", [
    ("sgd", "auto", "ddp", "cuda", "fused"),
    ("sgd", "auto", "fsdp", "cuda", "foreach"),  # no sharded fused SGD in torch
    ("adamw", "auto", "fsdp", "cuda", "fused"),  # DTensor has fused AdamW's rule
    ("adamw", "auto", "ddp", "cuda", "fused"),
    ("sgd", "auto", "fsdp", "cpu", "default"),
    ("sgd", "auto", "single", "cpu", "default"),
    ("sgd", "loop", "fsdp", "cuda", "loop"),
    ("sgd", "fused", "ddp", "cuda", "fused"),
    ("adamw", "fused", "fsdp", "cpu", "fused"),
])
def test_the_implementation_fits_the_optimizer_mode_and_device(name, implementation, mode,
                                                               device, picked):
    from train.optim import choose_implementation

    cfg = OptimConfig(name=name, implementation=implementation)
    assert choose_implementation(cfg, mode, device) == picked


def test_fused_sgd_under_fsdp_is_refused_by_validate():
    from common.validate import check_recipe
    from train.config import load_config

    default = str(REPO / "configs" / "default.yaml")
    with pytest.raises(UserError, match=r"^optim.implementation=fused does not work with mode "
                                        r"fsdp and optim.name=sgd"):
        check_recipe(load_config(default, ["mode=fsdp", "optim.implementation=fused"]))
    check_recipe(load_config(default, ["mode=ddp", "optim.implementation=fused"]))
    check_recipe(load_config(default, ["mode=fsdp", "optim.name=adamw",
                                       "optim.implementation=fused"]))
