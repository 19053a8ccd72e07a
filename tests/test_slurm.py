"""The SLURM example, run on this machine: shims stand in for srun/scontrol, two "nodes"."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port

pytestmark = pytest.mark.slow
SCRIPT = REPO / "launch" / "slurm" / "train.sbatch"

SRUN = """#!/bin/bash
# srun on a fake allocation: the command once per node, all on this machine.
while [[ "$1" == --* ]]; do shift; done
pids=()
for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node "$@" & pids+=($!); done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""
SCONTROL = """#!/bin/bash
# scontrol: every call recorded; `show hostnames` names this machine.
echo "$*" >> "$SCONTROL_LOG"
if [[ "$1" == show ]]; then echo 127.0.0.1; fi
"""
LAUNCHER = """#!/bin/bash
# Stands in for .venv/bin/python (so for the launcher): records its arguments, exits as told.
echo "$*" >> "$LAUNCHER_LOG"
exit "$LAUNCHER_EXIT"
"""


def shim(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.write_text(text)
    path.chmod(0o755)


def slurm_env(tmp_path: Path, submit_dir: Path) -> dict[str, str]:
    """Shims for srun, scontrol and make on PATH, and what SLURM sets in a 2-node job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim(bin_dir, "srun", SRUN)
    shim(bin_dir, "scontrol", SCONTROL)
    shim(bin_dir, "make", "#!/bin/bash\nexit 0\n")  # the venv exists already
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2",
            "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_JOB_NAME": "dptrain",
            "SLURM_JOB_ID": "42", "SLURM_SUBMIT_DIR": str(submit_dir),
            "SCONTROL_LOG": str(tmp_path / "scontrol.log"), "MASTER_PORT": str(free_port())}


def test_the_sbatch_script_trains_on_two_nodes(tmp_path):
    run_dir = tmp_path / "run"
    env = {**slurm_env(tmp_path, REPO), "CONFIG": "configs/default.yaml",
           "RUN_DIR": str(run_dir), "RESTARTS": "0"}
    done = subprocess.run(["bash", str(SCRIPT), "train.max_steps=4", "wandb.mode=disabled",
                           "data.synthetic.train_samples=2048", "data.synthetic.test_samples=301"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 4  # 2 nodes x 2 CPU workers
    assert summary["steps"] == 4
    assert "requeue" not in (tmp_path / "scontrol.log").read_text()  # it finished: no requeue


@pytest.mark.parametrize("launcher_exit, requeued", [(130, True), (0, False), (3, False)])
def test_interrupted_launchers_requeue_the_job(tmp_path, launcher_exit, requeued):
    """Exit 130 (the time limit's SIGTERM, a checkpoint written): `scontrol requeue` brings the
    job back. Stand-in launchers keep it to seconds; the run above uses the real ones."""
    submit = tmp_path / "submit"
    (submit / ".venv" / "bin").mkdir(parents=True)
    shim(submit / ".venv" / "bin", "python", LAUNCHER)
    env = {**slurm_env(tmp_path, submit), "LAUNCHER_LOG": str(tmp_path / "launcher.log"),
           "LAUNCHER_EXIT": str(launcher_exit)}
    done = subprocess.run(["bash", str(SCRIPT), "train.epochs=90"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == launcher_exit, done.stderr
    calls = (tmp_path / "scontrol.log").read_text().splitlines()
    assert ("requeue 42" in calls) == requeued, calls
    launchers = (tmp_path / "launcher.log").read_text().splitlines()
    assert sorted(line.split("--node-rank ")[1][0] for line in launchers) == ["0", "1"]
    # The default run folder has no job id: a job submitted again by hand resumes too.
    assert all("run.dir=runs/dptrain train.epochs=90" in line for line in launchers), launchers


def test_your_own_python_runs_the_launchers_and_no_venv_is_built(tmp_path):
    """PY=...: the launchers run with that Python and `make venv` is not run in the job."""
    submit = tmp_path / "submit"
    submit.mkdir()
    shim(tmp_path, "own-python", LAUNCHER)
    env = {**slurm_env(tmp_path, submit), "LAUNCHER_LOG": str(tmp_path / "launcher.log"),
           "LAUNCHER_EXIT": "0", "PY": str(tmp_path / "own-python")}
    shim(tmp_path / "bin", "make", f"#!/bin/bash\necho \"$*\" >> {tmp_path / 'make.log'}\n")
    done = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    launchers = (tmp_path / "launcher.log").read_text().splitlines()
    assert len(launchers) == 2, launchers
    assert all(line.startswith("-m launch --nnodes 2") for line in launchers), launchers
    assert not (tmp_path / "make.log").exists()
    del env["PY"]  # without PY: make venv, then .venv/bin/python (the test above)
    subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, timeout=30)
    assert (tmp_path / "make.log").read_text().split() == ["venv"]
