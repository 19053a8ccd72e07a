"""The doctor fails wherever the launcher refuses: for each check the launcher makes before
starting workers, a job it refuses (exit 2, one line) is a FAIL row of `make doctor` naming the
same problem (exit 1), never "ready to launch".

Each case calls both commands' `main()` in this process (tests/inprocess.py), as the same
arguments and environment would run them; one case runs both as real commands."""

from __future__ import annotations

import contextlib
import socket

import pytest

from common.config import to_yaml
from launch import doctor
from launch.plan import LAUNCH_ORDER
from tests.helpers import REPO, run_cli
from tests.inprocess import launcher_main, run_main
from train.config import load_config
from train.observe.wandb_sink import unreachable

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "default.yaml")

# A refusal of each launcher check: (check, launcher flags, overrides, environment, words of
# the refusal); `{tmp}` is the test's own folder. Not here: "backend" (gloo is in every torch
# build the tests run on) and "disk" (a full disk cannot be made without privileges).
PROXY = "http://127.0.0.1:{closed}"
CASES = [
    ("GPUs", [], ["dist.device=cuda"], {}, "no GPU is visible"),  # hidden: conftest.py
    ("recipe", ["--cpu"], ["optim.name=adam"], {}, "is not an optimizer"),
    ("device options", ["--cpu"], ["perf.precision=fp16"], {}, "needs a GPU"),
    ("restarts", ["--cpu", "--max-restarts", "-1"], [], {}, "must not be negative"),
    ("initial weights", ["--cpu"], ["model.init_from={tmp}/missing.pt"], {}, "missing.pt"),
    ("batch", ["--cpu"], ["train.batch_size=255"], {}, "not divisible by 2 workers"),
    ("schedule", ["--cpu"], ["optim.schedule=step"], {}, "lie at or beyond the run's end"),
    ("profile", ["--cpu"], ["perf.profile_steps=1000-1001"], {}, "profile_steps"),
    ("run folder", ["--cpu"], ["run.dir={tmp}/other"], {}, "already holds a different run"),
    ("wandb", ["--cpu"], ["wandb.mode=online"], {}, "no credentials"),  # run_cli hides them
    ("rendezvous port", ["--cpu", "--master-port", "{port}"], [], {}, "already in use"),
    ("dataset", ["--cpu"], ["data.name=mnist", "data.root={tmp}/empty",
                            "data.download=false"], {}, "cannot be read from"),
    ("dataset", ["--cpu"], ["data.synthetic.train_samples=100", "train.batch_size=128"], {},
     "smaller than one global batch (128)"),
    ("pretrained weights", ["--cpu"], ["model.pretrained=true"], {},  # lenet: none published
     "has no published weights"),
    # torchvision's weights: not in an empty hub cache, and the download goes through a proxy
    # whose port refuses connections (urllib and the doctor both follow https_proxy)
    ("pretrained weights", ["--cpu"], ["model.name=torchvision.resnet18",
                                       "model.pretrained=true"],
     {"TORCH_HOME": "{tmp}/hub", "https_proxy": PROXY, "HTTPS_PROXY": PROXY},
     "weights are not in the torch hub cache"),
]
NOT_MADE_HERE = {"backend", "disk"}


def test_every_launcher_check_is_a_doctor_row_and_has_a_case():
    rows = [name for name, _ in doctor.ROWS]
    assert [name for name in LAUNCH_ORDER if name not in rows] == []
    assert {case[0] for case in CASES} | NOT_MADE_HERE == set(LAUNCH_ORDER)


@pytest.mark.parametrize("check, flags, overrides, env, words", CASES,
                         ids=[f"{c[0]}:{(c[2] or c[1])[-1]}" for c in CASES])
def test_the_doctor_fails_where_the_launcher_refuses(tmp_path, monkeypatch, check, flags,
                                                     overrides, env, words):
    # What run_cli hides from a command: wandb credentials (the "wandb" case needs none).
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", "/dev/null")
    # Not the doctor's own allreduce row (two fresh processes per case, no launcher check;
    # tests/test_doctor.py runs it, and so does the real-commands case below).
    monkeypatch.setattr(doctor, "ROWS", [row for row in doctor.ROWS if row[0] != "allreduce"])
    with ports() as fill:
        args, env = arguments(tmp_path, fill, flags, overrides, env)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        unreachable.cache_clear()
        launched = run_main(launcher_main(monkeypatch), *args)
        unreachable.cache_clear()
        examined = run_main(doctor.main, *args)
    refused_alike(tmp_path, launched, examined, check, words)


def test_the_doctor_fails_where_the_launcher_refuses_as_real_commands(tmp_path):
    """The exit codes the shell sees, from fresh interpreters (the "batch" case)."""
    check, flags, overrides, env, words = next(c for c in CASES if c[0] == "batch")
    with ports() as fill:
        args, env = arguments(tmp_path, fill, flags, overrides, env)
        launched = run_cli("launch", *args, env=env, timeout=180)
        examined = run_cli("launch.doctor", *args, env=env, timeout=180)
    refused_alike(tmp_path, launched, examined, check, words)


@contextlib.contextmanager
def ports():
    """{port}: a port in use; {closed}: a port bound but not listening (connections refused)."""
    with socket.socket() as held, socket.socket() as closed:
        held.bind(("127.0.0.1", 0))
        held.listen()
        closed.bind(("127.0.0.1", 0))
        yield {"port": held.getsockname()[1], "closed": closed.getsockname()[1]}


def arguments(tmp_path, fill, flags, overrides, env) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a case, with `{tmp}` holding an empty folder and a
    folder of another run."""
    (tmp_path / "empty").mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text(to_yaml(load_config(CONFIG, ["train.epochs=1"])))
    fill = {**fill, "tmp": tmp_path}
    overrides = [a.format(**fill) for a in overrides]
    if not any(a.startswith("run.dir=") for a in overrides):
        overrides.append(f"run.dir={tmp_path / 'run'}")
    return ([*(a.format(**fill) for a in flags), CONFIG, *overrides],
            {k: v.format(**fill) for k, v in env.items()})


def refused_alike(tmp_path, launched, doctor, check, words) -> None:
    assert launched.returncode == 2, launched.stdout + launched.stderr
    refusal = launched.stderr.strip().splitlines()
    assert len(refusal) == 1 and refusal[0].startswith("error: "), launched.stderr
    assert words in refusal[0]  # refused for this case's reason
    assert not (tmp_path / "run").exists()  # refused before any worker started
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    failed = {name: detail for name, verdict, detail in table(doctor.stdout)
              if verdict == "FAIL"}
    assert check in failed, doctor.stdout
    assert words in failed[check]  # the same problem named
    assert "ready to launch" not in doctor.stdout


def table(stdout: str) -> list[tuple[str, str, str]]:
    """(check, verdict, detail) of each row the doctor printed."""
    found = []
    for line in stdout.splitlines():
        parts = [p.strip() for p in line.split(" | ", 2)]
        if len(parts) == 3 and parts[0] != "check":
            found.append((parts[0], parts[1], parts[2]))
    return found


def test_cpu_workers_beyond_the_usable_cores_are_a_warning_with_its_cost():
    from common.host import usable_cores
    from launch.cli import parse_args
    from launch.job import plan_job
    from launch.resource_checks import check_cores

    cores = usable_cores()
    fitting = plan_job(parse_args(["--cpu", "--gpus", str(cores), CONFIG]), dry=True)
    assert check_cores(fitting)[0] == "OK"
    job = plan_job(parse_args(["--cpu", "--gpus", str(2 * cores), CONFIG]), dry=True)
    verdict, detail = check_cores(job)
    assert verdict == "WARN", detail
    assert f"{2 * cores} CPU worker(s) x 1 thread(s) on {cores} usable core(s)" in detail
    assert "at least 2.0x the compute time" in detail and f"(GPUS={cores}) fit" in detail
