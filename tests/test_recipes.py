"""The recipe's features (AdamW, clipping, label smoothing, mixup/CutMix, EMA, warmup in epochs,
the step schedule) on every path: the same parameters as one process with the same global
batch, and a resume that is bitwise exact. One shared reference run keeps this short. Every
run is the workers' own code in gloo processes forked by the harness; the launcher's stop and
resume are test_fault_tolerance.py's."""

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, run_distributed, run_single, run_workers
from tests.workers import train_and_return_state

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "default.yaml")
# 8 steps per epoch, 12 steps: the step schedule's milestone (epoch 1) falls inside the run.
RECIPE = ["data.synthetic.train_samples=768", "data.synthetic.test_samples=301",
          "train.epochs=2", "train.max_steps=12", "train.batch_size=96", "wandb.mode=disabled",
          "optim.name=adamw", "optim.lr=0.004", "optim.weight_decay=0.05",
          "optim.clip_grad_norm=0.3", "optim.schedule=step", "optim.milestones=[1]",
          "optim.gamma=0.5", "optim.warmup_steps=0", "optim.warmup_epochs=0.5",
          "train.label_smoothing=0.1",
          "train.mixup_alpha=0.4", "train.cutmix_alpha=1.0", "train.ema_decay=0.9",
          "check.sync_every_steps=1", "run.overwrite=true",
          # One intra-op thread in every process: the reference's own thread count (all the
          # machine's cores) split its reductions differently from the workers' (see below).
          "dist.cpu_threads=1"]
# Per tensor, ||run - reference|| / ||reference||: summation order (the reference's one batch
# against micro-batches and allreduces) moves a whole tensor by little, but AdamW divides by
# sqrt(v), so an element whose gradient is near zero may move by up to the lr (4e-3), and a
# ReLU input within rounding of zero may pass in one run and not in the other: an elementwise
# tolerance could not tell that from a real difference. Measured (12 steps, every path below):
# on an Intel AVX512 machine under ATEN_CPU_CAPABILITY=default, avx2 and avx512, weights and
# EMA at most 7.9e-5, AdamW's moments at most 2.6e-4. On an AMD EPYC with AVX512 (2026-12-06):
# at most 3.6e-6 and 2.0e-5 under default and avx2, but under avx512, its default, the two
# 2-worker paths gave 1.19e-3 and 1.23e-2 (at step 3 still 1.8e-7; step 4 moved 41 weights of
# features.3 apart by up to 2e-4; the 3-worker path stayed at 2.9e-6). A real difference, one
# CutMix/mixup choice changed (train.cutmix_prob=0.4), measured 3.4e-1 on the weights and up
# to 1.5 on the moments on both machines. The bounds: about 8x the largest noise, 34x and 15x
# below the real difference.
WEIGHTS_TOL, MOMENTS_TOL = 1e-2, 1e-1


def assert_near(value, reference, tol, what):
    gap = float((value.double() - reference.double()).norm() / reference.double().norm())
    assert gap <= tol, f"{what}: ||difference|| / ||reference|| = {gap:.2e} > {tol:g}"


def assert_same_state(state, reference, exact=False):
    """Model, EMA and AdamW's moments alike (to float summation order, or bitwise)."""
    def check(value, ref, tol, what):
        if exact:
            torch.testing.assert_close(value, ref, rtol=0, atol=0)
        else:
            assert_near(value, ref, tol, what)

    for name, value in reference["model"].items():
        check(state["model"][name], value, WEIGHTS_TOL, name)
    for name, value in reference["ema"]["module"].items():
        check(state["ema"]["module"][name], value, WEIGHTS_TOL, f"EMA {name}")
    assert state["ema"]["updates"] == reference["ema"]["updates"] == 12
    for key, moments in reference["optimizer"]["state"].items():
        for which in ("exp_avg", "exp_avg_sq"):
            check(state["optimizer"]["state"][key][which], moments[which], MOMENTS_TOL,
                  f"{which} of parameter {key}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, no synchronization at all."""
    run_dir = tmp_path_factory.mktemp("recipe")
    state = run_single(train_and_return_state, [*RECIPE, f"run.dir={run_dir}"])
    return state, run_dir


def test_the_recipe_changes_training(reference):
    state, run_dir = reference
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # a record's lr is the next step's: after epoch 1, the milestone has halved it
    assert [r["lr"] for r in records] == pytest.approx([0.002, 0.002])
    assert all(0 < r["test_accuracy_ema"] <= 1 for r in records)
    assert records[-1]["test_accuracy_ema"] != records[-1]["test_accuracy"]
    assert len(state["optimizer"]["param_groups"]) == 2  # biases undecayed
    # the EMA differs from the weights: it averages them
    assert not torch.equal(state["ema"]["module"]["classifier.1.weight"],
                           state["model"]["classifier.1.weight"])


@pytest.mark.parametrize("world_size, path", [
    (2, ["mode=ddp"]),
    (3, ["mode=ddp", "train.grad_accum_steps=2"]),
    (2, ["mode=scratch", "scratch.algorithm=ring", "scratch.bucket_mb=0.1"]),
])
def test_the_recipe_on_n_workers_matches_one_process(tmp_path, reference, world_size, path):
    state = run_distributed(train_and_return_state, world_size,
                            [*RECIPE, *path, f"run.dir={tmp_path}"])[0]
    assert_same_state(state, reference[0])


def test_the_comparison_sees_a_real_difference(tmp_path, reference):
    """The bounds have teeth: one CutMix/mixup choice of another step fails them."""
    state = run_single(train_and_return_state, [*RECIPE, "train.cutmix_prob=0.4",
                                                f"run.dir={tmp_path}"])
    with pytest.raises(AssertionError, match="difference"):
        assert_same_state(state, reference[0])


def test_the_recipe_under_dataparallel_matches_one_process(tmp_path, reference):
    state = run_single(train_and_return_state, [*RECIPE, "mode=dp", f"run.dir={tmp_path}"])
    assert_same_state(state, reference[0])


def test_the_recipe_resumes_bitwise(tmp_path):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    first = run_workers(2, CONFIG, *RECIPE, f"run.dir={whole}")
    assert first.returncode == 0, first.stderr
    # stopped inside the first epoch (stops are agreed every 5 steps: at step 5)
    cut = run_workers(2, CONFIG, *RECIPE, f"run.dir={stopped}", "debug.sigterm_rank=1",
                      "debug.sigterm_step=3")
    assert cut.returncode == 130, cut.stderr
    assert torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)["step"] == 5
    again = run_workers(2, CONFIG, *RECIPE, f"run.dir={stopped}")
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout
    load = lambda d: torch.load(Path(d) / "checkpoints" / "last.pt", weights_only=True)  # noqa
    assert_same_state(load(stopped), load(whole), exact=True)
    assert (stopped / "metrics.jsonl").read_text().count("\n") == 2
    # Measurements, and how sync time was measured (not in a resumed, partial epoch) aside:
    strip = lambda d: [{k: v for k, v in json.loads(line).items() if "time" not in k  # noqa
                        and "per_s" not in k and "memory" not in k and k != "sync_method"}
                       for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert strip(stopped) == strip(whole)  # losses, accuracies, EMA's alike
