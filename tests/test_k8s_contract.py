"""Kubernetes, tested as a contract: no cluster runs here (docs/kubernetes.md says what that
leaves untested). What is tested:

- launch/k8s/*.yaml parse, and match the Kubeflow CRDs' OpenAPI schemas (the excerpts in
  tests/k8s_schemas/, each naming its source), and refer to each other consistently;
- the launcher takes its node layout from the variables each operator injects;
- "pods" as process trees on this machine, each given only the environment the operator would
  inject (127.0.0.1 as the master) and the manifests' command: 2 nodes x 2 workers train
  exactly as one node of 4 workers; SIGTERM to one pod (what the kubelet sends on preemption)
  stops every worker at one step boundary with a checkpoint, both pods exit 130 (a restartable
  exit under both manifests), and the pods started again resume and finish equal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from launch.cli import parse_args
from tests.helpers import PYTHON, REPO, free_port, run_workers
from tests.jobs import CONFIG, RUN
from tests.k8s_schema import validate

K8S = REPO / "launch" / "k8s"
SCHEMAS = REPO / "tests" / "k8s_schemas"
MANIFESTS = {"trainjob": "trainjob", "runtime": "trainingruntime", "pytorchjob": "pytorchjob"}
# 2 epochs of 12 steps; one thread per worker, so that 1 x 4 and 2 x 2 do the same arithmetic.
SHORT = [*RUN, "train.epochs=2", "dist.cpu_threads=1"]


def manifest(name: str) -> dict:
    return yaml.safe_load((K8S / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_each_manifest_matches_its_crds_schema(name):
    doc, excerpt = manifest(name), json.loads((SCHEMAS / f"{MANIFESTS[name]}.json").read_text())
    assert excerpt["source"].startswith("github.com/kubeflow/")
    assert doc["apiVersion"] == f"{excerpt['group']}/{excerpt['version']}"
    assert doc["kind"] == excerpt["kind"]
    assert validate(excerpt["schema"], doc) == []
    # The validator can fail: a misspelt field and a wrong type are caught.
    broken = {**doc, "spec": {**doc["spec"], "runPolicyy": {}}}
    assert validate(excerpt["schema"], broken) == [".spec.runPolicyy: unknown field"]
    assert validate(excerpt["schema"], {**doc, "kind": 7}) == [".kind: 7 is not of type string"]


def test_the_manifests_refer_to_each_other_and_run_the_launcher():
    claim = manifest("pvc")
    assert (claim["kind"], claim["spec"]["accessModes"]) == ("PersistentVolumeClaim",
                                                             ["ReadWriteMany"])
    runtime, job = manifest("runtime"), manifest("trainjob")
    assert job["spec"]["runtimeRef"] == {"name": runtime["metadata"]["name"],
                                         "kind": runtime["kind"]}
    pod = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]
    pods = [pod["template"]["spec"]] + [
        spec["template"]["spec"] for spec in
        manifest("pytorchjob")["spec"]["pytorchReplicaSpecs"].values()]
    for spec in pods:
        assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert spec["terminationGracePeriodSeconds"] > 30  # the launcher's shutdown timeout
    # What a user types by hand, no shell glue; the operator's variables are not overridden.
    trainer = job["spec"]["trainer"]
    assert trainer["command"] == ["python", "-m", "launch"]
    assert not [e for e in trainer["env"] if e["name"].startswith(("PET_", "MASTER_"))]
    for spec in pods[1:]:
        assert spec["containers"][0]["command"] == ["python", "-m", "launch"]


@pytest.mark.parametrize(("environ", "flags", "expected"), [
    ({"PET_NNODES": "2", "PET_NPROC_PER_NODE": "4", "PET_NODE_RANK": "1",
      "PET_MASTER_ADDR": "job-node-0-0.job", "PET_MASTER_PORT": "29400"}, [],
     ("2", 4, 1, "job-node-0-0.job", 29400)),
    ({"PET_NNODES": "2", "PET_NPROC_PER_NODE": "auto", "PET_NODE_RANK": "0",
      "PET_MASTER_ADDR": "m", "PET_MASTER_PORT": "29400"}, [], ("2", None, 0, "m", 29400)),
    ({"WORLD_SIZE": "3", "RANK": "2", "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456"},
     [], ("3", None, 2, "job-master-0", 23456)),
    # A flag given wins; torchrun's own workers (LOCAL_RANK) are no PyTorchJob pod.
    ({"PET_NNODES": "2", "PET_NODE_RANK": "1"}, ["--node-rank", "0"], ("2", None, 0, None, None)),
    ({"WORLD_SIZE": "4", "RANK": "3", "MASTER_ADDR": "h", "MASTER_PORT": "1", "LOCAL_RANK": "1"},
     [], ("1", None, 0, None, None)),
    ({}, [], ("1", None, 0, None, None)),
])
def test_the_launcher_takes_the_node_layout_from_the_operators_variables(monkeypatch, environ,
                                                                          flags, expected):
    for name in ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR",
                 "PET_MASTER_PORT", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT",
                 "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    args = parse_args([*flags, CONFIG])
    assert (args.nnodes, args.gpus, args.node_rank, args.master_addr,
            args.master_port) == expected


def pods(operator_env: list[dict[str, str]], run_dir: Path) -> list[subprocess.Popen]:
    """One process tree per pod, each with only what the operator injects (plus the image's
    PATH and HOME, and no GPU), running the manifests' command with a test config."""
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"),
            "CUDA_VISIBLE_DEVICES": ""}
    return [subprocess.Popen([PYTHON, "-m", "launch", CONFIG, *SHORT, f"run.dir={run_dir}"],
                             cwd=REPO, env={**base, **env}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
            for env in operator_env]


def trainer_v2_env(port: int) -> list[dict[str, str]]:
    return [{"PET_NNODES": "2", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": str(rank),
             "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)} for rank in (0, 1)]


def pytorchjob_v1_env(port: int) -> list[dict[str, str]]:
    return [{"WORLD_SIZE": "2", "RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(port), "PET_NPROC_PER_NODE": "2"} for rank in (0, 1)]


def model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def one_node(tmp_path_factory) -> Path:
    """The same global batch on one node of 4 workers (their own `main` in gloo processes
    forked by the harness: tests.helpers.run_workers)."""
    run_dir = tmp_path_factory.mktemp("one_node")
    result = run_workers(4, CONFIG, *SHORT, f"run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.mark.slow
def test_two_trainer_pods_of_two_workers_train_like_one_node_of_four(tmp_path, one_node):
    started = pods(trainer_v2_env(free_port()), tmp_path)
    for pod in started:
        out, err = pod.communicate(timeout=400)
        assert pod.returncode == 0, err
        assert "launch: nodes from the Kubeflow Trainer (PET_*) environment" in out
    assert json.loads((tmp_path / "summary.json").read_text())["world_size"] == 4
    assert equal(model(tmp_path), model(one_node))


@pytest.mark.slow
def test_sigterm_to_one_pod_checkpoints_and_the_restarted_pods_resume(tmp_path, one_node):
    """PyTorchJob v1's variables; the kubelet's SIGTERM goes to the container's first process,
    the launcher of pod 1 (node rank 1, no checkpoint writer)."""
    port = free_port()
    started = pods(pytorchjob_v1_env(port), tmp_path)
    for line in started[0].stdout:
        if "step 3/12" in line:
            break
    started[1].send_signal(signal.SIGTERM)
    errors = [pod.communicate(timeout=120)[1] for pod in started]
    assert [pod.returncode for pod in started] == [130, 130], errors
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert 3 <= saved["step"] < 24
    assert (f"launch: interrupted by SIGTERM; the workers stopped at step {saved['step']} and "
            f"wrote a checkpoint there") in errors[1]
    # restartPolicy ExitCode (v1) / the JobSet (v2) start the pods again, same variables.
    again = pods(pytorchjob_v1_env(port), tmp_path)
    outputs = [pod.communicate(timeout=400) for pod in again]
    assert [pod.returncode for pod in again] == [0, 0], [err for _, err in outputs]
    assert f"resumed from {tmp_path / 'checkpoints'}" in outputs[0][0]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 24
    # Bit for bit, on 4 workers too: the resumed DDP rebuilds its buckets before its first step
    # (train/strategies/ddp.py: settle_buckets), so the ring sums in the uninterrupted order.
    assert equal(model(tmp_path), model(one_node))
