"""launch/slurm/train.sbatch under a real SLURM on this machine (tests/slurm_cluster.py).

Two slurmd "nodes" on one host: one launcher per node, two CPU workers each. The script is
submitted as a user submits it, with sbatch from the repo; on the command line only what this
machine cannot give (`--gpus-per-node=8`, `--cpus-per-task=32`) and what the test must bound
(`--time`, `--output`) are overridden. tests/test_slurm.py has the stand-in version, which
also covers the script's exit codes other than 130.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port
from tests.slurm_cluster import ENDED, SlurmCluster, start_cluster, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.serial]
SCRIPT = REPO / "launch" / "slurm" / "train.sbatch"
# 8 steps per epoch (global batch 256): a few seconds of training in all.
SMALL = ["wandb.mode=disabled", "data.synthetic.train_samples=2048",
         "data.synthetic.test_samples=301"]
JOB_TIMEOUT_S = 240  # a job takes about 30 s here; the machine is shared and slow at times


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    # The script runs `make venv` first; with .venv up to date (make test builds it) that does
    # nothing, rather than a pip install inside the job.
    stale = subprocess.run(["make", "-q", "venv"], cwd=REPO, capture_output=True)
    assert stale.returncode == 0, ".venv is older than requirements.txt: run `make venv` first"
    yield from start_cluster(tmp_path_factory.mktemp("slurm"))


def submit(cluster: SlurmCluster, folder: Path, *overrides: str) -> int:
    options = [f"--nodes={len(cluster.nodes)}", "--gpus-per-node=0",
               f"--cpus-per-task={cluster.cpus}", "--time=10", f"--output={folder}/%x-%j.out"]
    env = {"CONFIG": "configs/default.yaml", "RUN_DIR": str(folder / "run"), "RESTARTS": "0",
           "MASTER_PORT": str(free_port())}
    return cluster.submit(SCRIPT, *SMALL, *overrides, options=options, env=env, cwd=REPO)


def output(folder: Path, job_id: int) -> str:
    return (folder / f"dptrain-{job_id}.out").read_text()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sbatch_trains_on_two_nodes(cluster, tmp_path):
    job_id = submit(cluster, tmp_path, "train.max_steps=4")
    job = cluster.wait_until_ended(job_id, JOB_TIMEOUT_S)
    out = output(tmp_path, job_id)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), out + cluster.logs()
    assert job["NumNodes"] == str(len(cluster.nodes)) == "2"
    assert out.count("worker(s) in all") == 2, out  # one launcher per node
    assert "Nothing to be done for" in out, out  # `make venv` changed nothing
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["steps"]) == (4, 4)  # 2 nodes x 2 CPU workers
    assert metrics(run_dir)[-1]["step"] == 4
    assert (run_dir / "checkpoints" / "last.pt").exists()
    assert "requeue" not in out  # it finished: nothing to requeue


@pytest.mark.timeout(600)  # two runs of the job: 70-150 s here, by the machine's load
def test_the_time_limit_signal_requeues_the_job_and_it_resumes(cluster, tmp_path):
    """SIGTERM to the job's steps, as `#SBATCH --signal=TERM@120` sends it before the time
    limit (`scancel --signal=TERM`, without --batch or --full, signals the steps and not the
    batch shell, as that does): both launchers exit 130 after a checkpoint, the script runs
    `scontrol requeue`, and the job comes back under its id and resumes from that checkpoint.

    Each run of a requeued job truncates its output file unless the script appends
    (`--open-mode=append`): the one file here holds both runs.
    """
    steps = 48
    job_id = submit(cluster, tmp_path, f"train.max_steps={steps}", "checkpoint.every_steps=4")
    run_dir = tmp_path / "run"

    def first_checkpoint() -> bool:
        job = cluster.job(job_id)
        assert job["JobState"] not in ENDED, output(tmp_path, job_id)
        return any((run_dir / "checkpoints").glob("step_*.pt"))

    wait_until("a first checkpoint", first_checkpoint, JOB_TIMEOUT_S, cluster.logs, 0.2)
    cluster.run("scancel", "--signal=TERM", str(job_id))
    job = cluster.wait_for_job(job_id, "requeued or ended",
                               lambda job: job["Restarts"] != "0" or job["JobState"] in ENDED,
                               JOB_TIMEOUT_S)
    assert job["Restarts"] == "1", output(tmp_path, job_id) + cluster.logs()
    job = cluster.wait_until_ended(job_id, JOB_TIMEOUT_S)
    out = output(tmp_path, job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), out

    # First run: both launchers took the interrupt path, then the script requeued the job.
    assert out.count("launch: interrupted by SIGTERM") == 2, out
    assert out.count(f"requeueing job {job_id} to resume") == 1, out
    named = set(re.findall(r"the workers stopped at step (\d+) and wrote a checkpoint", out))
    assert len(named) == 1, out  # both launchers name the same step
    stopped = int(named.pop())
    assert 4 <= stopped < steps, out
    # Second run: from that checkpoint to the end.
    resumed = re.search(r"resumed from (\S+)/step_(\d+)\.pt", out)
    assert resumed and int(resumed[2]) == stopped, out
    assert Path(resumed[1]) == run_dir / "checkpoints"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["steps"]) == (4, steps)
    records = metrics(run_dir)
    assert records[-1]["step"] == steps
    assert [r["epoch"] for r in records] == list(range(1, steps // 8 + 1))  # none done twice
