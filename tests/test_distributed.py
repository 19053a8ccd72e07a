"""Distributed behaviour with real gloo processes on the CPU."""

from pathlib import Path

import pytest
import torch

from tests.helpers import PARITY_RUN as SMALL
from tests.helpers import run_distributed, run_single
from tests.workers import (
    agree_on_failure,
    evaluate_fresh_model,
    fatal_dump_file,
    train_and_return_params,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def single_process_params(one_process_reference):
    """tests/conftest.py: the one-process run that test_paths.py compares every path with."""
    return one_process_reference


# DDP with 2 and 3 workers against one process with the same global batch: test_paths.py
# (`test_every_path_matches_one_process`, mode=ddp), against this same reference.
def test_training_moved_every_parameter_of_the_reference(single_process_params):
    """The parity tests have teeth: the reference is not the initialization."""
    initial = _initial_params()
    assert single_process_params.keys() == initial.keys()
    for name, value in single_process_params.items():
        assert not torch.allclose(value, initial[name])


def test_a_different_global_batch_does_not_match(tmp_path, single_process_params):
    """The parity above is not luck: halving the global batch gives other parameters."""
    params = run_distributed(train_and_return_params, 2,
                             [*SMALL, f"run.dir={tmp_path}", "train.batch_size=48"])[0]
    differs = [not torch.allclose(params[k], v, rtol=1e-5, atol=1e-6)
               for k, v in single_process_params.items()]
    assert any(differs)


# mode fsdp gathers parameters in every forward: with 100 per batch its ranks hold 6 and 5
# batches of the 1001 samples, and must still run the same number of forwards.
@pytest.mark.parametrize("world_size, path", [(2, ["train.eval_batch_size=64"]),
                                              (3, ["train.eval_batch_size=64"]),
                                              (2, ["mode=fsdp", "train.eval_batch_size=100"]),
                                              # the stream path has no `data.images` (issue 21)
                                              (2, ["mode=fsdp", "train.eval_batch_size=100",
                                                   "data.loader=stream", "data.num_workers=0"])])
def test_distributed_evaluation_equals_single_process_on_an_odd_test_set(world_size, path):
    overrides = ["data.synthetic.train_samples=600", "data.synthetic.test_samples=1001",
                 "train.batch_size=96", *path]
    single = run_single(evaluate_fresh_model, overrides)
    results = run_distributed(evaluate_fresh_model, world_size, overrides)
    assert single["samples"] == 1001
    for result in results:  # every rank reports the same, complete totals
        assert result["samples"] == 1001
        assert result["correct"] == single["correct"]
        assert result["loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert 0 < single["correct"] < 1001


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_fsdp_evaluates_when_a_rank_has_no_test_sample(loader):
    """2 test samples on 3 ranks: rank 2 has no batch at all, and still runs the forward the
    others run (an empty one, shaped as its split's batches)."""
    overrides = ["data.synthetic.train_samples=96", "data.synthetic.test_samples=2",
                 "train.batch_size=48", "mode=fsdp", f"data.loader={loader}",
                 "data.num_workers=0"]
    single = run_single(evaluate_fresh_model, overrides)
    for result in run_distributed(evaluate_fresh_model, 3, overrides):
        assert result["samples"] == 2
        assert result["correct"] == single["correct"]


def test_a_setup_error_on_one_rank_reaches_every_rank():
    results = run_distributed(agree_on_failure, 3, 2)
    assert results == ["disk full|agreed=True"] * 3


def _initial_params():
    from models import build_model

    torch.manual_seed(0)
    return build_model("lenet", 1, 10, 28, init="torch").state_dict()


def test_a_harness_process_leaves_no_stack_dump_file():
    """Processes forked from the harness's server end with os._exit: the quick cleanups run
    anyway, so no empty dump file stays in /tmp for a later process with the same pid."""
    path, armed = run_single(fatal_dump_file)
    assert armed and not Path(path).exists()
