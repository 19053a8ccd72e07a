"""common/validate.py: every check of a config that needs only the config and its world, in
this process; and the launcher, the doctor and the worker refusing through it alike."""

from __future__ import annotations

import sys

import pytest
import torch

from common.config import load_config
from common.errors import UserError
from common.validate import (
    SECTIONS,
    World,
    _cpu_has_bf16,
    validate,
    validate_with_data,
)
from launch.checks import CHECKS, FAIL, run_check
from launch.cli import parse_args
from launch.doctor import ROWS
from launch.job import plan_job, worker_overrides
from launch.plan import LAUNCH_ORDER, make_plan
from tests.helpers import REPO
from train.dist import DistContext
from train.worker import train

CONFIG = str(REPO / "configs" / "default.yaml")
CPU2 = World(size=2, device="cpu")
GPU2 = World(size=2, device="cuda")

# (launcher flags, overrides, message, the worker too): refusals of a config on the CPU. The
# worker leaves out what only a launcher sees (several nodes, an elastic range).
REFUSED = [
    ([], ["model.name=vgg"], "model.name='vgg' is not a model", True),
    ([], ["optim.name=adam"], "optim.name='adam' is not an optimizer: sgd or adamw", True),
    ([], ["data.name=imagenet"], "data.name 'imagenet' is unknown; choose one of", True),
    ([], ["optim.warmup_steps=5", "optim.warmup_epochs=1"], "both set the warmup; set one", True),
    ([], ["model.init_from=weights.pt", "model.pretrained=true"],
     "model.init_from and model.pretrained=true both set the initial weights", True),
    (["--mode", "fsdp"], ["train.ema_decay=0.9"], "train.ema_decay does not work with mode fsdp",
     True),
    ([], ["perf.precision=fp16"], "perf.precision=fp16 needs a GPU", True),
    ([], ["model.sync_bn=true"], "model.sync_bn needs mode ddp on GPUs", True),
    (["--mode", "dp"], ["perf.compile=on"], "perf.compile=on does not work with mode dp", True),
    ([], ["ddp.static_graph=true", "train.grad_accum_steps=2"],
     "ddp.static_graph=true with train.grad_accum_steps>1 fails inside DDP", True),
    ([], ["data.decoder=nvjpeg"], "data.decoder=nvjpeg decodes on the GPU", True),
    (["--mode", "scratch"], ["ddp.comm_hook=fp16"],
     "ddp.comm_hook applies to mode ddp only (mode is scratch)", True),
    (["--mode", "scratch"], ["ddp.zero=true"],
     "ddp.zero applies to mode ddp only (mode is scratch)", True),
    (["--mode", "fsdp"], ["ddp.zero=true"], "mode fsdp shards the optimizer state itself", True),
    ([], ["fsdp.reshard_after_forward=false"],
     "fsdp.reshard_after_forward=false applies to mode fsdp only (mode is ddp)", True),
    (["--mode", "fsdp"], ["scratch.algorithm=naive"],
     "scratch.algorithm=naive is a key of mode scratch, which mode fsdp does not read", True),
    (["--mode", "dp", "--nnodes", "2", "--master-addr", "127.0.0.1"], [],
     "mode dp runs one process on one node", False),
    (["--gpus", "3"], [], "train.batch_size=256 (the global batch) is not divisible by 3 workers",
     True),
    ([], ["train.grad_accum_steps=200"],
     "train.grad_accum_steps=200 micro-batches do not fit in 128 samples per worker", True),
    ([], ["train.mixup_alpha=0.2", "train.batch_size=98"],
     "need an even batch per worker (mixing pairs samples half a batch apart); 98 over 2 "
     "worker(s) gives 49", True),
    (["--gpus", "2", "--nnodes", "1:3", "--master-addr", "127.0.0.1"], ["train.batch_size=18"],
     "not divisible by 4 workers; choose a multiple of 4 (--nnodes 1:3 runs 2 to 6 workers; the "
     "batch must divide each of [2, 4, 6])", False),
    ([], ["optim.name=adamw", "optim.nesterov=true"],
     "optim.nesterov=true applies only to optim.name=sgd; this config has optim.name=adamw", True),
    ([], ["optim.schedule=step"],
     "optim.milestones=[30,60,80]: 30, 60, 80 lie at or beyond the run's end", True),
    ([], ["perf.profile_steps=7-9"],
     "perf.profile_steps=7-9 is outside the run: it has 2 optimizer steps (1-2)", True),
    ([], ["data.val_fraction=0.2"], "data.val_fraction=0.2 splits an image folder's train/; "
     "data.name=synthetic has its own test set", True),
    ([], ["checkpoint.keep_best=true", "checkpoint.best_metric=accuracy"],
     "checkpoint.best_metric='accuracy' is not an epoch figure; choose one of test_accuracy",
     True),
    ([], ["checkpoint.keep_best=true", "checkpoint.best_metric=test_accuracy_ema"],
     "checkpoint.best_metric=test_accuracy_ema needs train.ema_decay", True),
]


def refused_by(fn, *args) -> str:
    with pytest.raises(UserError) as info:
        fn(*args)
    return str(info.value)


@pytest.mark.parametrize("flags, overrides, message, worker", REFUSED)
def test_launcher_doctor_and_worker_refuse_through_validate(tmp_path, flags, overrides, message,
                                                           worker):
    args = parse_args(["--cpu", *flags, CONFIG, f"run.dir={tmp_path / 'run'}",
                       "train.max_steps=2", *overrides])
    job = plan_job(args, dry=True)
    # validate itself, in the world the launcher plans
    assert message in refused_by(validate, job.cfg, job.world)
    # the launcher: the first FAIL of its checks, before anything starts
    assert message in refused_by(make_plan, args)
    # the doctor: one of its rows (its own network rows aside) FAILs with the same line
    failed = [detail for name, fn in ROWS if name in CHECKS
              for verdict, detail in [run_check(fn, job)] if verdict == FAIL]
    assert any(message in detail for detail in failed), failed
    if worker:  # the worker's entry, in a world of job.world's size (no process group)
        cfg = load_config(CONFIG, worker_overrides(args))
        ctx = DistContext(rank=0, local_rank=0, world_size=job.world.size,
                          local_world_size=job.world.size, device=torch.device("cpu"),
                          backend="none", cpu_threads=1)
        assert message in refused_by(train, cfg, ctx)
    assert not (tmp_path / "run").exists()


def test_every_section_is_a_row_of_the_launcher_and_of_the_doctor():
    doctor_rows = [name for name, _ in ROWS]
    for section in SECTIONS:
        assert section in LAUNCH_ORDER and section in doctor_rows
        assert CHECKS[section].__name__ == f"check_{section.replace(' ', '_')}"


@pytest.mark.parametrize("overrides, world, message", [
    (["mode=scratch", "model.sync_bn=true"], GPU2, "model.sync_bn needs mode ddp on GPUs"),
    (["data.decoder=nvjpeg"], GPU2, "data.decoder=nvjpeg needs data.name=imagefolder, "
                                    "data.loader=stream and data.cache=none"),
    (["data.decoder=nvjpeg", "data.name=imagefolder", "data.loader=stream", "data.cache=decoded"],
     GPU2, "data.decoder=nvjpeg needs data.name=imagefolder"),
    (["train.batch_size=12"], World(size=6, nodes=3, device="cpu"), None),
    (["train.batch_size=12"], World(size=8, nodes=2, device="cpu"), "not divisible by 8 workers"),
    (["mode=dp"], World(size=1, nodes=2, device="cuda"), "mode dp runs one process on one node"),
])
def test_checks_in_other_worlds(overrides, world, message):
    cfg = load_config(CONFIG, overrides)
    if message is None:
        validate(cfg, world)
    else:
        assert message in refused_by(validate, cfg, world)


def test_the_gpu_runs_what_the_cpu_refuses():
    for override in ("perf.precision=fp16", "model.sync_bn=true"):
        cfg = load_config(CONFIG, [override])
        assert validate(cfg, GPU2) == []
        assert "needs" in refused_by(validate, cfg, CPU2)


def test_only_runs_the_sections_named():
    cfg = load_config(CONFIG, ["model.name=vgg", "train.batch_size=255"])
    assert "is not a model" in refused_by(validate, cfg, CPU2, ["recipe"])
    assert "not divisible by 2" in refused_by(validate, cfg, CPU2, ["batch"])
    assert validate(cfg, CPU2, ["profile"]) == []
    assert "is not a model" in refused_by(validate, cfg, CPU2)  # the first section first


def test_bf16_on_a_cpu_without_bf16_units_is_a_warning():
    cfg = load_config(CONFIG, ["perf.precision=bf16"])
    expected = [] if _cpu_has_bf16() else ["perf.precision=bf16 on a CPU without bf16 units "
                                           "(AVX512-BF16/AMX): expect it to be slower than fp32"]
    assert validate(cfg, CPU2) == expected
    assert validate(cfg, GPU2) == []


def test_elastic_sizes_are_every_node_count_of_the_range():
    assert World(size=6, nodes=3, min_nodes=1, device="cpu").sizes == [2, 4, 6]
    assert World(size=6, nodes=3, min_nodes=3, device="cpu").sizes == [6]
    assert World(size=4, device="cpu").sizes == [4]


def test_checks_that_wait_for_the_data():
    mixing = load_config(CONFIG, ["train.mixup_alpha=0.2"])
    assert "the data has 1 class" in refused_by(validate_with_data, mixing, 1, 100)
    validate_with_data(mixing, 2, 100)
    profiled = load_config(CONFIG, ["perf.profile_steps=5-8", "data.name=cifar10"])
    validate(profiled, CPU2)  # the steps are not known before the data
    assert "it has 7 optimizer steps (1-7)" in refused_by(validate_with_data, profiled, 10, 7)
    validate_with_data(profiled, 10, 8)


def test_log_tensorboard_without_the_package_is_refused_alike(tmp_path, monkeypatch):
    # None in sys.modules makes `import tensorboard` fail as on a machine without it.
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    test_launcher_doctor_and_worker_refuse_through_validate(
        tmp_path, [], ["log.tensorboard=true"], "log.tensorboard=true but the tensorboard "
        "package is not installed: pip install tensorboard", True)
    with pytest.raises(UserError) as info:
        validate(load_config(CONFIG, ["log.tensorboard=true"]), CPU2)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
