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


def shim(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.write_text(text)
    path.chmod(0o755)


def test_the_sbatch_script_trains_on_two_nodes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim(bin_dir, "srun", SRUN)
    shim(bin_dir, "scontrol", "#!/bin/bash\necho 127.0.0.1\n")
    shim(bin_dir, "make", "#!/bin/bash\nexit 0\n")  # the venv exists already
    run_dir = tmp_path / "run"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_JOB_NAME": "dptrain",
           "SLURM_JOB_ID": "42", "SLURM_SUBMIT_DIR": str(REPO),
           "CONFIG": "configs/default.yaml", "MASTER_PORT": str(free_port()),
           "RUN_DIR": str(run_dir), "RESTARTS": "0"}
    done = subprocess.run(["bash", str(SCRIPT), "train.max_steps=4", "wandb.mode=disabled",
                           "data.synthetic.train_samples=2048", "data.synthetic.test_samples=301"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 4  # 2 nodes x 2 CPU workers
    assert summary["steps"] == 4
