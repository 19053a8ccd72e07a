"""A real SLURM on this machine: munged, slurmctld and two slurmd "nodes", all in a temp folder.

Debian's slurm-wlm runs here as root with the smallest setup that works in a container:
proctrack/linuxproc and task/none (no cgroups), no accounting database, its own munge socket
and its own free ports, so it never meets another SLURM or munge on the machine. This build
runs several slurmd on one host (`slurmd -N NAME`, a Port per node), so the allocation has two
nodes, as on a cluster; both have the machine's real CPU count and memory (`slurmd -C`).
`.ci/run` installs the packages; without them `require_slurm` fails under CI and skips
elsewhere, naming the install command.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil
import pytest

from tests.helpers import Env, free_port

INSTALL = "apt-get install -y --no-install-recommends slurm-wlm munge"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "sinfo", "squeue", "srun")
# A job's states once it ended for good (a requeued job goes back to PENDING instead).
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
START_TIMEOUT_S = 60
T = TypeVar("T")


def require_slurm() -> None:
    """Fail under CI (`.ci/run` installs SLURM, so it must run there); skip elsewhere."""
    missing = [name for name in (*DAEMONS, *CLIENTS, "munge") if shutil.which(name) is None]
    if not missing:
        return
    why = (f"SLURM is not installed ({', '.join(missing)} missing): `{INSTALL}` installs it, "
           f"as .ci/run does")
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


def wait_until(what: str, check: Callable[[], T | None], timeout: float,
               on_timeout: Callable[[], str] = str, interval: float = 0.5) -> T:
    """Call `check` until it returns something other than None (or False); `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s\n{on_timeout()}")
        time.sleep(interval)


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str]  # SLURM_CONF and the rest, for every SLURM command and job
    nodes: list[str]  # node names, node 0 first
    cpus: int  # CPUs per node

    def run(self, *cmd: str, timeout: float = 30) -> str:
        """A SLURM command (scontrol, scancel, ...) against this cluster; its stdout."""
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr}")
        return done.stdout

    def submit(self, script: Path, *args: str, options: Sequence[str] = (),
               env: Env | None = None, cwd: Path | None = None) -> int:
        """`sbatch --parsable OPTIONS SCRIPT ARGS` from `cwd`; the job id."""
        full_env = {k: v for k, v in {**self.env, **(env or {})}.items() if v is not None}
        done = subprocess.run(["sbatch", "--parsable", *options, str(script), *args], cwd=cwd,
                              env=full_env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"sbatch failed: {done.stderr}"
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, Reason, ExitCode, NodeList ...)."""
        line = self.run("scontrol", "--oneliner", "show", "job", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait_for_job(self, job_id: int, what: str, check: Callable[[dict[str, str]], bool],
                     timeout: float) -> dict[str, str]:
        """Poll the job until `check(job)` holds; the job record then."""
        def poll() -> dict[str, str] | None:
            job = self.job(job_id)
            return job if check(job) else None

        return wait_until(f"job {job_id} {what}", poll, timeout,
                          on_timeout=lambda: f"{self.job(job_id)}\n{self.logs()}")

    def wait_until_ended(self, job_id: int, timeout: float) -> dict[str, str]:
        return self.wait_for_job(job_id, "ended", lambda job: job["JobState"] in ENDED, timeout)

    def logs(self, lines: int = 15) -> str:
        """The last lines of every daemon's log, for failure messages."""
        parts = []
        for path in sorted(self.root.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)


def hardware() -> tuple[int, str]:
    """CPUs and the node's hardware as slurmd sees it: `CPUs=2 Boards=1 ... RealMemory=24105`."""
    line = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30,
                          check=True).stdout.splitlines()[0]
    fields = [f for f in line.split() if not f.startswith("NodeName=")]
    cpus = int(next(f for f in fields if f.startswith("CPUs=")).split("=")[1])
    return cpus, " ".join(fields)


def node_names(host: str) -> list[str]:
    """Node 0 is this machine's name, which must resolve: the script's MASTER_ADDR is node 0's
    name. SLURM orders nodes by name, and `host` sorts before `host-2`."""
    try:
        socket.gethostbyname(host)
    except OSError as exc:
        raise AssertionError(f"this machine's name {host!r} does not resolve ({exc}): node 0 "
                             f"is named after it, and its name is the rendezvous address") from None
    return [host, f"{host}-2"]


def slurm_conf(root: Path, host: str, nodes: list[str], hw: str) -> str:
    # One slurmd per node, each on its own port; all reached at 127.0.0.1.
    node_lines = "\n".join(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 "
                           f"Port={free_port()} {hw} State=UNKNOWN" for name in nodes)
    return f"""\
ClusterName=dptrain-tests
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds (default 120) before it may start again.
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# Pending jobs are looked at every 2 s (default 60): a requeued job starts soon after.
SchedulerParameters=sched_interval=2
ReturnToService=2
KillWait=5
MinJobAge=600
{node_lines}
PartitionName=tests Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _hermetic_env(conf: Path) -> dict[str, str]:
    """This process's environment without any SLURM job's variables (the tests may themselves
    run inside a job), pointing every SLURM command at `conf`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    return {**env, "SLURM_CONF": str(conf)}


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _stop(procs: list[subprocess.Popen], root: Path, conf: Path) -> None:
    """SIGTERM the daemons, SIGKILL what is left, then every process of this cluster's that
    is no child of ours: slurmstepd (which keeps its slurmd's log open) and job processes
    (which carry SLURM_CONF; slurmstepd overwrites its own environment with its title)."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
    for proc in reversed(procs):
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    killed = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and (
                    proc.environ().get("SLURM_CONF") == str(conf)
                    or any(Path(f.path).is_relative_to(root) for f in proc.open_files())):
                proc.kill()
                killed.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    psutil.wait_procs(killed, timeout=10)


def start_cluster(root: Path) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and the slurmd's; yield once every node is idle; stop all."""
    require_slurm()
    host = socket.gethostname().split(".")[0]
    nodes = node_names(host)
    cpus, hw = hardware()
    conf = root / "slurm.conf"
    for folder in ("state", "spool", "munge"):
        (root / folder).mkdir(mode=0o755)
    (root / "plugstack.conf").write_text("")  # not /etc/slurm's
    conf.write_text(slurm_conf(root, host, nodes, hw))
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    env = _hermetic_env(conf)
    cluster = SlurmCluster(root, env, nodes, cpus)
    procs: list[subprocess.Popen] = []
    try:
        # --force: munged refuses a socket whose parent folders other users cannot enter
        # (pytest's tmp folders are 0700); only root talks to this one.
        socket_path = root / "munge" / "munge.socket"
        procs.append(_start(["munged", "--foreground", "--force", f"--socket={socket_path}",
                             f"--key-file={key}", f"--log-file={root}/munged.log",
                             f"--pid-file={root}/munge/munged.pid",
                             f"--seed-file={root}/munge/munged.seed"], root / "munged.out", env))
        wait_until("munged answers", lambda: _munge_works(socket_path), START_TIMEOUT_S,
                   cluster.logs)
        procs.append(_start(["slurmctld", "-D", "-i"], root / "slurmctld.out", env))
        wait_until("slurmctld answers", lambda: _ping(env), START_TIMEOUT_S, cluster.logs)
        for name in nodes:
            procs.append(_start(["slurmd", "-D", "-N", name], root / f"slurmd-{name}.out", env))
        wait_until("every node idle", lambda: _all_idle(env, nodes), START_TIMEOUT_S,
                   cluster.logs)
        yield cluster
    finally:
        _cancel_jobs(env)
        _stop(procs, root, conf)


def _munge_works(socket_path: Path) -> bool:
    if not socket_path.exists():
        return False
    encode = subprocess.run(["munge", "-n", "-S", str(socket_path)], capture_output=True,
                            timeout=10)
    return encode.returncode == 0


def _ping(env: dict[str, str]) -> bool:
    done = subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True,
                          timeout=30)
    return "is UP" in done.stdout


def _all_idle(env: dict[str, str], nodes: list[str]) -> bool:
    done = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N %t"], env=env,
                          capture_output=True, text=True, timeout=30)
    states = dict(line.split() for line in done.stdout.splitlines() if line.strip())
    return all(states.get(name) == "idle" for name in nodes)


def _cancel_jobs(env: dict[str, str]) -> None:
    """Cancel every job still there and wait (bounded) for them to leave the nodes."""
    def jobs() -> list[str]:
        done = subprocess.run(["squeue", "--noheader", "--format=%i"], env=env,
                              capture_output=True, text=True, timeout=30)
        return done.stdout.split() if done.returncode == 0 else []

    try:
        if ids := jobs():
            subprocess.run(["scancel", "--signal=KILL", "--full", *ids], env=env,
                           capture_output=True, timeout=30)
            subprocess.run(["scancel", *ids], env=env, capture_output=True, timeout=30)
            deadline = time.monotonic() + 30
            while jobs() and time.monotonic() < deadline:
                time.sleep(0.5)
    except (OSError, subprocess.SubprocessError):
        pass  # the daemons are stopped next in any case

