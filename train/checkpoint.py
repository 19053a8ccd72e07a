"""Full-state checkpoints: written atomically, verified on load, rotated.

`checkpoints/step_00000123.pt` holds everything needed to continue bitwise: model, optimizer,
LR scheduler, AMP scaler, position (epoch, step, batch inside the epoch), every rank's RNG
states and running metrics, the config's identity and the world size. Each file has a
`.sha256` beside it; `last.pt` is the newest one (a hard link, so it costs no second write).
Loading uses `weights_only=True` (no arbitrary unpickling) and this worker's device.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.errors import UserError
from train.runlog import atomic_write

log = logging.getLogger(__name__)
STEP_FILE = re.compile(r"^step_(\d{8})\.pt$")


def rng_state() -> dict[str, Any]:
    """This process's random generators, as tensors and plain values (weights_only-safe)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": numpy_state(),
        "python": _python_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
    set_numpy_state(state["numpy"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))


def numpy_state(generator: Any = np.random) -> list[Any]:
    """A numpy RandomState's state as tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = generator.get_state()
    return [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def set_numpy_state(state: list[Any], generator: Any = np.random) -> None:
    kind, keys, pos, has_gauss, cached = state
    generator.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _python_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, torch.tensor(internal, dtype=torch.int64), gauss]


class Checkpoints:
    """The checkpoint files of one run folder (the main worker writes; every rank may read)."""

    def __init__(self, folder: Path, keep: int):
        self.folder = folder
        self.keep = keep

    def save(self, state: dict[str, Any]) -> Path:
        """Write `state` as step_<step>.pt (+ .sha256), point last.pt at it, drop old ones."""
        self.folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        blob = buffer.getvalue()
        path = self.folder / f"step_{state['step']:08d}.pt"
        atomic_write(path, lambda p: p.write_bytes(blob))
        atomic_write(_digest_path(path), lambda p: p.write_text(hashlib.sha256(blob).hexdigest()))
        atomic_write(self.folder / "last.pt", lambda p: _link_or_copy(path, p))
        self._rotate()
        return path

    def candidates(self) -> list[Path]:
        """Step checkpoints, newest first."""
        if not self.folder.is_dir():
            return []
        steps = [p for p in self.folder.iterdir() if STEP_FILE.match(p.name)]
        return sorted(steps, key=lambda p: p.name, reverse=True)

    def load_latest(self, device: torch.device) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that reads back intact; damaged ones are skipped with a warning.

        None when there is none at all; an error when there are some but none is valid.
        """
        found = self.candidates()
        for path in found:
            try:
                return path, load(path, device)
            except CorruptCheckpoint as exc:
                log.warning("skipping checkpoint %s: %s", path, exc)
        if found:
            raise UserError(f"no valid checkpoint in {self.folder} ({len(found)} damaged); "
                            f"set checkpoint.resume=false to start over, or move them away")
        return None

    def _rotate(self) -> None:
        for old in self.candidates()[self.keep:]:
            old.unlink(missing_ok=True)
            _digest_path(old).unlink(missing_ok=True)


class CorruptCheckpoint(Exception):
    pass


def load(path: Path, device: torch.device) -> dict[str, Any]:
    """Read a checkpoint onto `device`, checking its digest; never unpickles arbitrary objects."""
    blob = path.read_bytes()
    digest = _digest_path(path)
    if digest.is_file() and digest.read_text().strip() != hashlib.sha256(blob).hexdigest():
        raise CorruptCheckpoint("its sha256 does not match (truncated or damaged)")
    try:
        return torch.load(io.BytesIO(blob), map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read means "damaged"
        raise CorruptCheckpoint(str(exc).splitlines()[0][:200]) from None


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # file systems without hard links
        shutil.copyfile(src, dst)


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")
