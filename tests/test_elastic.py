"""Elastic membership (`--nnodes MIN:MAX`): launchers acting as nodes on loopback, a node that
leaves for good, and the input an elastic range must pass."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

import psutil
import pytest
import torch

from common.errors import UserError
from launch.checks import check_batch
from launch.cli import parse_args
from launch.job import plan_job
from launch.plan import make_plan, worker_environment
from tests.helpers import REPO, start_nodes
from train.config import load_config
from train.run.identity import check_resumable, identity

# Signals, stalls and their timeouts: away from the CPU-bound tests (tests/suite.py).
pytestmark = pytest.mark.serial

CONFIG = str(REPO / "configs" / "default.yaml")
# 1152 samples, global batch 96 (divisible by 3 and by 2 workers): 12 steps per epoch, 48 in
# all; a checkpoint every 2 steps, all kept, so that the one the shrunken group resumed from
# is still there for the reference run.
RUN = ["data.synthetic.train_samples=1152", "data.synthetic.test_samples=120",
       "train.batch_size=96", "train.epochs=4", "wandb.mode=disabled", "log.every_steps=4",
       "dist.cpu_threads=1", "checkpoint.every_steps=2", "checkpoint.keep=100"]
# A node that left is noticed after 3 heartbeats (6 s); then 3 s of last call for latecomers.
ELASTIC = ["dist.node_heartbeat_s=2", "dist.rendezvous_last_call_s=3",
           "dist.rendezvous_timeout_s=180"]


def params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wait_for_checkpoint_of(run_dir: Path, world_size: int, nodes: list, timeout: float) -> int:
    """The step of the first checkpoint written by `world_size` workers."""
    deadline, seen = time.monotonic() + timeout, set()
    while time.monotonic() < deadline:
        for node in nodes:
            assert node.poll() is None, node.communicate()
        for path in sorted((run_dir / "checkpoints").glob("step_*.pt")):
            if path.name in seen:
                continue
            seen.add(path.name)
            with contextlib.suppress(Exception):  # a file still being renamed into place
                saved = torch.load(path, weights_only=True)
                if saved["world_size"] == world_size:
                    return saved["step"]
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint of {world_size} workers within {timeout:.0f} s")


@pytest.mark.slow
def test_a_job_outlives_a_node_that_leaves_and_matches_a_two_node_resume(tmp_path):
    run_dir = tmp_path / "elastic"
    args = [CONFIG, *RUN, *ELASTIC, f"run.dir={run_dir}", "--max-restarts", "1"]
    nodes = start_nodes("2:3", [args] * 3)
    try:
        step = wait_for_checkpoint_of(run_dir, 3, nodes, timeout=300)
        assert step < 40, "trained too fast for the kill to land inside the run"
        leaving = psutil.Process(nodes[2].pid).children(recursive=True)
        assert leaving
        nodes[2].kill()  # node 2 (not node 0, which hosts the rendezvous) leaves for good
        _, alive = psutil.wait_procs(leaving, timeout=60)  # the parent-death signal
        assert not alive, f"node 2's workers outlived it: {[p.pid for p in alive]}"
        outputs = [node.communicate(timeout=400) for node in nodes[:2]]
    finally:
        for node in nodes:
            node.kill()
            node.wait()
    for node, (_, err) in zip(nodes[:2], outputs, strict=True):
        assert node.returncode == 0, err

    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["steps"], summary["world_size"]) == (48, 2)  # the same optimizer steps
    (change,) = summary["world_size_changes"]
    assert (change["from"], change["to"]) == (3, 2) and step <= change["step"] < 48
    said = "".join(out for out, _ in outputs)
    assert (f"world size 3 -> 2 workers (an elastic job, --nnodes 2:3): "
            f"step_{change['step']:08d}.pt continues at step {change['step']}") in said
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [12, 24, 36, 48]
    changed = [r for r in records if "world_size_change" in r]
    assert len(changed) == 1 and changed[0]["world_size_change"] == change
    assert all(r["world_size"] == (2 if r["step"] > change["step"] else 3) for r in records)
    assert all(len(r["time_step_ms_ranks"]) == r["world_size"] for r in records)

    # The reference: the run folder as it was at that checkpoint, continued by two nodes.
    reference = tmp_path / "reference"
    (reference / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy(run_dir / name, reference / name)
    for path in (run_dir / "checkpoints").glob(f"step_{change['step']:08d}.pt*"):
        shutil.copy(path, reference / "checkpoints" / path.name)
    again = start_nodes("2", [[CONFIG, *RUN, f"run.dir={reference}",
                               "checkpoint.allow_changes=true"]] * 2)
    for node in again:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err
    for name, value in params(reference).items():
        assert torch.equal(params(run_dir)[name], value), name
    keys = ("epoch", "step", "train_loss", "test_accuracy", "world_size")
    assert ([[r[k] for k in keys] for r in metrics(reference)]
            == [[r[k] for k in keys] for r in records])


def test_the_plan_passes_the_range_to_torchrun_and_tells_the_workers(tmp_path):
    plan = make_plan(parse_args(["--cpu", "--gpus", "1", "--nnodes", "2:4", "--node-rank", "1",
                                 "--master-addr", "127.0.0.1", "--master-port", "29400",
                                 CONFIG, "train.batch_size=24", f"run.dir={tmp_path}",
                                 "dist.rendezvous_last_call_s=7", "dist.node_heartbeat_s=3"]))
    args = plan.torchrun_args
    assert args[args.index("--nnodes") + 1] == "2:4"
    conf = args[args.index("--rdzv-conf") + 1]
    assert "is_host=false" in conf and "last_call_timeout=7" in conf
    assert "keep_alive_interval=3" in conf
    env = worker_environment(plan)
    assert env["DPTRAIN_ELASTIC"] == "2:4"
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    fixed = make_plan(parse_args(["--cpu", "--gpus", "1", CONFIG, f"run.dir={tmp_path}"]))
    assert "DPTRAIN_ELASTIC" not in worker_environment(fixed)


def test_the_batch_must_split_at_every_world_size_of_the_range():
    def verdict(*argv: str):
        return check_batch(plan_job(parse_args(["--cpu", "--gpus", "2", "--nnodes", "1:3",
                                                "--master-addr", "h", *argv])))

    assert verdict(CONFIG, "train.batch_size=12")[1] == (
        "global batch 12 = 2 worker(s) x 6 per worker; global batch 12 = 4 worker(s) x 3 per "
        "worker; global batch 12 = 6 worker(s) x 2 per worker")
    with pytest.raises(UserError, match=r"not divisible by 4 workers.*--nnodes 1:3 runs 2 to 6 "
                                        r"workers; the batch must divide each of \[2, 4, 6\]"):
        verdict(CONFIG, "train.batch_size=18")


def test_an_elastic_worker_resumes_another_world_size_but_not_another_config():
    # A scaled learning rate follows the global batch, not the worker count: 3 -> 2 continues.
    old = load_config(CONFIG, [*RUN, "optim.scale_lr=linear"])
    state = {"config": identity(old), "world_size": 3, "batch_in_epoch": 5}
    check_resumable(old, state, "checkpoint x")
    state["config"] = identity(load_config(CONFIG, RUN))
    with pytest.raises(UserError, match="optim.lr: 0.1 -> 0.2"):
        check_resumable(load_config(CONFIG, [*RUN, "optim.lr=0.2"]), state, "checkpoint x")


# A bad range is one line and exit 2: tests/unit/test_bad_input.py.


def test_an_elastic_job_without_restarts_is_warned_about():
    from launch.checks import WARN, check_restarts

    job = plan_job(parse_args(["--cpu", "--nnodes", "2:3", "--master-addr", "h", CONFIG]))
    verdict, detail = check_restarts(job)
    assert verdict == WARN and "the first node that leaves ends the job" in detail
    job = plan_job(parse_args(["--cpu", "--nnodes", "2:3", "--master-addr", "h",
                               "--max-restarts", "2", CONFIG]))
    assert check_restarts(job)[0] != WARN


def test_an_elastic_job_keeps_one_default_folder_at_every_size(tmp_path, monkeypatch):
    """The launcher names the default folder for the whole range; a worker of the job, at any
    size of it, must find the same one (else a job that shrank would start over elsewhere)."""
    from common.host import ELASTIC_ENV
    from train.dist import DistContext
    from train.worker import settle_folder

    monkeypatch.chdir(tmp_path)
    job = plan_job(parse_args(["--cpu", "--gpus", "2", "--nnodes", "2:3", "--master-addr", "h",
                               CONFIG, *RUN]), dry=True)
    fixed = plan_job(parse_args(["--cpu", "--gpus", "2", "--nnodes", "3", "--master-addr", "h",
                                 CONFIG, *RUN]), dry=True)
    # The worker count is no part of the name: a fixed-size job of this config continues it too.
    assert job.cfg.run.dir == fixed.cfg.run.dir
    monkeypatch.setenv(ELASTIC_ENV, "2:3")  # what the launcher tells its workers
    folders = set()
    for world_size in (4, 6):
        cfg = load_config(CONFIG, [*RUN, "dist.device=cpu"])
        settle_folder(cfg, DistContext(0, 0, world_size, 2, torch.device("cpu"), "none", 1))
        folders.add(cfg.run.dir)
    assert folders == {job.cfg.run.dir}
