"""Every pair of options together at least once (tests/matrix.py), each combination run for 4
steps with real gloo processes: it trains, resumes bitwise from a stop inside its epoch, `make
eval` and `make export` read its checkpoint, and where the math says so it equals one process
with the same global batch. What the launcher refuses is its one table (train/refusals.py):
each row is refused, and no combination outside it is.

Three pools of spawned ranks (3, 2 and 1 workers) run their combinations in turn, each in a
fresh process group over the pool's one store (tests/matrix_workers.py): no interpreter starts
per training."""

import itertools
import math

import pytest
import torch

from common.errors import UserError
from tests.helpers import REPO, run_cli, run_distributed
from tests.matrix import COMBOS, COMMON, OPTIONS, name_of, not_applicable, overrides, refused
from tests.matrix_workers import finite, run_pool
from tests.unit.test_torchvision_data import write_mnist
from tools.make_images import write_image_folder
from train.refusals import REFUSALS, render_table

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
CONFIG = str(REPO / "configs" / "default.yaml")
NAMES = [name_of(c) for c in COMBOS]
# Parity with one process holds where nothing but summation order differs: fp32 without a
# compressing hook, and no mixup (each worker pairs its own samples). Measured over the 8
# such combinations (4 SGD steps; AVX512, avx2 and default kernels alike): at most 3.0e-8 apart;
# the bound is 30x that.
PARITY_TOL = {"rtol": 1e-5, "atol": 1e-6}
# Every combination resumes bit for bit, DDP on 3 workers and PowerSGD included: a resumed DDP
# rebuilds its buckets in gradient order before its first step, as the uninterrupted run did
# after its step 1 (train/strategies/ddp.py: settle_buckets); without that, a ring over three
# ranks sums each element in another order for one step (measured 1.9e-9 on fp32, 9.2e-7
# through the bf16 hook).


def parity(combo: dict) -> bool:
    return (combo["workers"] != "1" and combo["mode"] != "dp" and combo["precision"] == "fp32"
            and combo["hook"] == "none" and combo["recipe"] == "plain")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix-data")
    write_mnist(root / "idx", "MNIST", n_train=48, n_test=21)
    write_image_folder(root / "images", 48, 21, classes=3, min_size=20, max_size=28)
    return root


@pytest.fixture(scope="module")
def results(data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("matrix-runs")
    pools: dict[int, list[dict]] = {3: [], 2: [], 1: []}
    for name, combo in zip(NAMES, COMBOS, strict=True):
        job = {"name": name, "overrides": [*COMMON, *overrides(combo, str(data))],
               "run_dir": str(runs / name), "alone": combo["mode"] == "dp"}
        pools[int(combo["workers"])].append(job)
        if parity(combo):
            pools[1].append({**job, "name": f"{name}/one", "reference": True,
                             "run_dir": str(runs / f"{name}-one")})
    found = {}
    for size, jobs in pools.items():
        for job, result in zip(jobs, run_distributed(run_pool, size, jobs, timeout=800)[0],
                               strict=True):
            found[job["name"]] = result
    return found


def test_every_allowed_pair_occurs_and_every_combination_is_allowed():
    assert len(set(NAMES)) == len(NAMES)
    for a, b in itertools.combinations(OPTIONS, 2):
        for x, y in itertools.product(OPTIONS[a], OPTIONS[b]):
            pair = {a: x, b: y}
            if not_applicable(pair) is None and refused(pair) is None:
                assert any(c[a] == x and c[b] == y for c in COMBOS), pair
    for combo in COMBOS:
        assert all(refused(dict(p)) is None for p in itertools.combinations(combo.items(), 2))
    assert len(COMBOS) < 40  # a covering set, not the product (over 10,000)


def plan(tmp_path, workers: str, extra: list[str]):
    from launch.cli import parse_args
    from launch.plan import make_plan

    return make_plan(parse_args(["--cpu", "--gpus", workers, CONFIG, *extra,
                                 f"run.dir={tmp_path / 'plan'}", "run.overwrite=true"]))


@pytest.mark.parametrize("row", REFUSALS, ids=lambda r: r.feature.split()[0])
def test_the_launcher_refuses_each_row_of_the_table(tmp_path, row):
    for mode in row.modes:
        with pytest.raises(UserError) as refusal:
            plan(tmp_path, "2", [*COMMON, f"mode={mode}", *row.overrides])
        assert str(refusal.value) == row.line.format(mode=mode)


def test_the_launcher_refuses_nothing_else(tmp_path, data):
    for combo in COMBOS:
        plan(tmp_path, combo["workers"], [*COMMON, *overrides(combo, str(data))])


def test_a_refusal_is_one_line_before_any_worker(tmp_path):
    row = next(r for r in REFUSALS if r.modes == ("fsdp",) and "ema" in r.feature)
    result = run_cli("launch", "--cpu", "--mode", "fsdp", CONFIG, *COMMON, *row.overrides,
                     f"run.dir={tmp_path / 'r'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {row.line.format(mode='fsdp')}"]
    assert not (tmp_path / "r").exists()


def test_the_docs_show_the_table_as_the_code_has_it():
    assert render_table() in (REPO / "docs" / "parallelism.md").read_text()


@pytest.mark.parametrize("name", NAMES)
def test_the_combination_trains_resumes_evaluates_and_exports(results, name):
    found = results[name]
    whole, resumed = found["whole"], found["resumed"]
    assert finite(found["records"]) and whole["step"] == 4
    assert any(not torch.equal(whole["model"][k], v) for k, v in found["at_cut"].items())
    assert resumed["step"] == 4
    combo = COMBOS[NAMES.index(name)]
    for part in ("model", "ema", "optimizer"):
        if part in whole:
            torch.testing.assert_close(resumed[part], whole[part], rtol=0, atol=0)
    assert found["eval"]["samples"] == 21 and found["eval"]["step"] == 4
    assert math.isfinite(found["eval"]["loss"]) and 0 <= found["eval"]["top1_accuracy"] <= 1
    assert found["export"]["step"] == 4
    assert found["exported"].keys() == whole["model"].keys()
    for key, value in resumed["model"].items():  # the checkpoint `make export` read
        assert torch.equal(found["exported"][key], value), key
    if parity(combo):
        one = results[f"{name}/one"]["model"]
        for key, value in one.items():
            torch.testing.assert_close(whole["model"][key], value, **PARITY_TOL)
