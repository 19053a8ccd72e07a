"""wandb: one run per job, from the main worker only.

Other ranks never import wandb, so they cannot open a run of their own or hang in its init
(PITFALLS 9). `wandb.mode=auto` logs online when this machine has credentials and offline
otherwise; an offline run is written under `run.dir/wandb` and uploaded later with
`wandb sync`. A resumed job continues the same wandb run: its id is kept in the checkpoint.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import netrc
import os
import platform
import re
import ssl
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from common.config import to_dict
from common.errors import UserError
from common.schema import Config, WandbConfig
from train.dist import DistContext

log = logging.getLogger(__name__)
SECRET = re.compile(r"key|token|secret|password", re.IGNORECASE)
# How long the wandb server may take to answer before an online run is refused (auto: falls
# back to offline); wandb's own init waits about 90 s before it fails.
CONNECT_TIMEOUT_S = 5.0
INIT_TIMEOUT_S = 15  # wandb.init's own limit, for a server that answers but opens no run


def credentials() -> str | None:
    """Where wandb would find an API key on this machine, or None."""
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY is set"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if path.is_file() and netrc.netrc(path).authenticators(host or ""):
            return f"logged in ({path})"
    except (netrc.NetrcParseError, OSError):
        return None
    return None


def server_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


@functools.cache
def unreachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why `url` gives no HTTP answer within `timeout` seconds (through the proxy the
    environment names, as wandb would), or None when it answers: any status, or a TLS
    certificate this python does not trust (wandb may, with its own CA bundle). Name
    resolution included: the request runs in a thread, getaddrinfo takes no timeout."""
    found: list[str | None] = [f"no answer within {timeout:g} s"]

    def ask() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                   timeout=timeout).close()
            found[0] = None
        except urllib.error.HTTPError:  # a status: the server is there
            found[0] = None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            found[0] = None if isinstance(reason, ssl.SSLError) else str(reason)[:120]

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return found[0] if not thread.is_alive() else f"no answer within {timeout:g} s"


def resolve_mode(cfg: WandbConfig) -> tuple[str, str]:
    """(online | offline | disabled, why). `auto` without the wandb package logs nothing to
    wandb (machines with only torch's stack installed, e.g. the GPU check's)."""
    if cfg.mode != "auto":
        return cfg.mode, f"wandb.mode={cfg.mode}"
    if importlib.util.find_spec("wandb") is None:
        return "disabled", "wandb.mode=auto and the wandb package is not installed"
    found = credentials()
    if not found:
        return "offline", "no credentials (WANDB_API_KEY or `wandb login`): logging offline"
    why_not = unreachable(server_url())
    if why_not:
        return "offline", f"the wandb server {server_url()} cannot be reached ({why_not}): " \
                          f"logging offline"
    return "online", found


def check_usable(cfg: WandbConfig) -> None:
    """The mode can run here: the package installed, and credentials for `online`. Checked by
    the launcher and by the main worker before anything in the run folder changes."""
    mode, _ = resolve_mode(cfg)
    if mode == "disabled":
        return
    if importlib.util.find_spec("wandb") is None:
        raise UserError(f"wandb.mode={cfg.mode} but the wandb package is not installed; set "
                        f"wandb.mode=disabled")
    if mode == "online" and not credentials():
        raise UserError("wandb.mode=online but no credentials: set WANDB_API_KEY or run `wandb "
                        "login`, or use wandb.mode=offline and `wandb sync` later")
    why_not = unreachable(server_url()) if mode == "online" else None
    if why_not:
        raise UserError(f"wandb.mode=online but the wandb server {server_url()} cannot be "
                        f"reached ({why_not}); run with wandb.mode=offline (logs into "
                        f"run.dir/wandb for a later `wandb sync`) or wandb.mode=disabled")


def system_facts(ctx: DistContext, mode: str) -> dict[str, Any]:
    if ctx.device.type == "cuda":
        devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        devices = [platform.processor() or platform.machine()]
    return {"world_size": ctx.world_size, "mode": mode, "backend": ctx.backend,
            "device": ctx.device.type, "device_names": devices, "torch": torch.__version__,
            "cpu_threads_per_worker": ctx.cpu_threads}


def public_config(cfg: Config) -> dict[str, Any]:
    """The resolved config with anything that looks like a secret left out."""
    def clean(tree: dict[str, Any]) -> dict[str, Any]:
        return {k: clean(v) if isinstance(v, dict) else v
                for k, v in tree.items() if not SECRET.search(k)}
    return clean(to_dict(cfg))


class WandbSink:
    """A monitor sink that logs step and epoch figures to one wandb run.

    A checkpointed part: its state is the run id, so that a resumed job continues the same
    wandb run. The run opens at `start`, once a resume has restored the id.
    """

    def __init__(self, cfg: Config, ctx: DistContext, path: str, folder: Path):
        self.cfg, self.ctx, self.path, self.folder = cfg, ctx, path, folder
        self.mode, self.why = resolve_mode(cfg.wandb)
        self.id: str | None = None
        self.run: Any = None

    def state_dict(self) -> dict[str, Any]:
        return {"wandb_run_id": self.id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.id = state.get("wandb_run_id")

    def start(self) -> None:
        import wandb

        cfg = self.cfg
        try:
            self.run = wandb.init(
                mode=self.mode, dir=str(self.folder), project=cfg.wandb.project,
                entity=cfg.wandb.entity, name=cfg.wandb.name or cfg.run.name,
                group=cfg.wandb.group, tags=cfg.wandb.tags, id=self.id,
                resume="allow" if self.id else None,
                config={**public_config(cfg), "system": system_facts(self.ctx, self.path)},
                settings=wandb.Settings(silent=True, console="off",
                                        init_timeout=INIT_TIMEOUT_S),
            )
        except Exception as exc:  # noqa: BLE001 - wandb raises many kinds; one line for all
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise UserError(f"wandb could not start its {self.mode} run ({first}); "
                            f"wandb.mode=offline logs into run.dir/wandb for a later `wandb "
                            f"sync`, wandb.mode=disabled logs nothing") from None
        # Our own step counter: a resumed run repeats steps after its last checkpoint, which
        # wandb's built-in step (strictly increasing) would drop.
        self.run.define_metric("trainer/step")
        self.run.define_metric("*", step_metric="trainer/step")
        self.id = self.run.id
        where = f"{self.folder / 'wandb'}" if self.mode == "offline" else self.run.url
        log.info("wandb: %s run %s (%s); %s", self.mode, self.id, self.why, where)

    def epoch_start(self, epoch: int, steps: int, done: int) -> None:
        pass

    def advance(self) -> None:
        pass

    def log_step(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"trainer/step": step, **{f"train/{k}": v for k, v in values.items()}})

    def log_epoch(self, record: dict[str, Any]) -> None:
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        self.run.log({"trainer/step": record["step"],
                      **{f"epoch/{k}": v for k, v in numbers.items()}})
        self.run.summary.update({k: v for k, v in numbers.items()})

    def close(self) -> None:
        if self.run is None:
            return
        self.run.finish()
        if self.mode == "offline":
            log.info("wandb: upload this run with: %s", sync_commands(Path(self.run.dir).parent))


def sync_commands(segment: Path) -> str:
    """`wandb sync` for an offline run; a resumed job leaves one folder per segment (same run
    id): the first is synced as is, the later ones appended in order (`wandb sync --append`)."""
    run_id = segment.name.rsplit("-", 1)[-1]
    segments = sorted(segment.parent.glob(f"offline-run-*-{run_id}"))
    tool = wandb_command()
    return " && ".join(f"{tool} sync {'--append ' if i else ''}{s}"
                       for i, s in enumerate(segments or [segment]))


def wandb_command() -> str:
    """The wandb command of this Python's environment (`.venv/bin/wandb`, relative to the
    current folder when inside it), so that the printed line runs as printed without an
    activated venv; plain `wandb` when there is none beside the interpreter."""
    # Not resolved: .venv may be a link to a shared venv, and the link is what users typed.
    tool = Path(os.path.abspath(sys.executable)).parent / "wandb"
    if not tool.is_file():
        return "wandb"
    try:
        return str(tool.relative_to(Path.cwd()))
    except ValueError:
        return str(tool)


class NoWandb:
    """The run id's keeper when wandb is off: a resumed run keeps the id it had, so that
    turning wandb back on later continues the same wandb run."""

    def __init__(self) -> None:
        self.id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"wandb_run_id": self.id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.id = state.get("wandb_run_id")
