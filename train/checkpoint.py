"""Full-state checkpoints: the checkpointer pulls `state_dict()`s from the run's parts (as
torchtitan's does), the main worker writes them atomically, every rank can read them back.

`checkpoints/step_00000123.pt` holds everything needed to continue bitwise: model, optimizer,
LR scheduler, AMP scaler, position (epoch, step, batch inside the epoch), every rank's own
parts (RNG states, running metrics, sync state), the config's identity and the world size.
Each file has a `.sha256` beside it; `last.pt` is the newest one (a hard link, so it costs no
second write). Loading uses `weights_only=True` (no arbitrary unpickling) and the CPU: each
part's `load_state_dict` puts tensors where they belong.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from common.errors import UserError
from common.files import atomic_write
from train.dist import DistContext

log = logging.getLogger(__name__)
STEP_FILE = re.compile(r"^step_(\d{8})\.pt$")
# Parts whose state is merged into the top level of the file (the layout checkpoints have
# had from the start): the position ("epoch", "step", "batch_in_epoch") and the wandb run id.
FLAT_PARTS = ("position", "tracking")


class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> None: ...


class Checkpointer:
    """Saves and restores the run's parts.

    `parts` are the same on every rank (model, optimizer, ...): the main worker's are saved.
    `rank_parts` differ per rank (RNG, running totals, sync state): every rank's are gathered
    to the main worker, and on resume each rank gets its own back. A rank part may define
    `load_other_world(states)` for a resume with another number of workers.
    """

    def __init__(self, files: Checkpoints, ctx: DistContext, parts: Mapping[str, Stateful],
                 rank_parts: Mapping[str, Stateful], identity: dict[str, Any]):
        self.files, self.ctx, self.identity = files, ctx, identity
        self.parts, self.rank_parts = dict(parts), dict(rank_parts)
        self.last_saved: str | None = None  # the newest file this process wrote (main worker)

    def save(self) -> Path | None:
        """Every rank contributes its own parts; the main worker writes the file."""
        mine = {k: v for k, part in self.rank_parts.items()
                if (v := part.state_dict()) is not None}
        ranks: list[Any] | None = [mine]
        if self.ctx.distributed:
            # Only the main worker writes: gather to it alone (error feedback can be as large
            # as the gradients).
            ranks = [None] * self.ctx.world_size if self.ctx.is_main else None
            dist.gather_object(mine, ranks, dst=0)
        if not self.ctx.is_main:
            return None
        state: dict[str, Any] = {}
        for key, part in self.parts.items():
            if key in FLAT_PARTS:
                state.update(part.state_dict())
            else:
                state[key] = part.state_dict()
        state.update(ranks=ranks, world_size=self.ctx.world_size, config=self.identity)
        path = self.files.save(state)
        self.last_saved = str(path)
        return path

    def restore(self, state: dict[str, Any]) -> None:
        """Give every part its state back (already checked: same run, allowed world size)."""
        for key, part in self.parts.items():
            if key in FLAT_PARTS:
                part.load_state_dict(state)
            elif key in state:
                part.load_state_dict(state[key])
        ranks = state["ranks"]
        for key, part in self.rank_parts.items():
            if len(ranks) == self.ctx.world_size:
                part.load_state_dict(ranks[self.ctx.rank].get(key))
            elif hasattr(part, "load_other_world"):
                part.load_other_world([r.get(key) for r in ranks])


class Checkpoints:
    """The checkpoint files of one run folder (the main worker writes; every rank may read)."""

    def __init__(self, folder: Path, keep: int):
        self.folder = folder
        self.keep = keep

    def save(self, state: dict[str, Any]) -> Path:
        """Write `state` as step_<step>.pt (+ .sha256), point last.pt at it, drop old ones.

        Each write is durable before the next one starts: a crash at any moment leaves the
        previous checkpoint valid (a step file without its .sha256 is still read and checked
        by unpickling)."""
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

    def load_latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that reads back intact; damaged ones are skipped with a warning.

        None when there is none at all; an error when there are some but none is valid.
        """
        found = self.candidates()
        for path in found:
            try:
                return path, load(path)
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


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU, checking its digest; never unpickles arbitrary objects."""
    blob = path.read_bytes()
    digest = _digest_path(path)
    if digest.is_file() and digest.read_text().strip() != hashlib.sha256(blob).hexdigest():
        raise CorruptCheckpoint("its sha256 does not match (truncated or damaged)")
    if not blob:
        raise CorruptCheckpoint("the file is empty")
    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read means "damaged"
        lines = str(exc).strip().splitlines()
        raise CorruptCheckpoint((lines[0] if lines else type(exc).__name__)[:200]) from None


def peek_position(path: Path) -> tuple[int, int] | None:
    """(epochs completed, steps completed) of a checkpoint, its tensors left on disk (memory-
    mapped, no digest): for the launcher and the doctor. None when it does not read back."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["epoch"]), int(state["step"])
    except Exception:  # noqa: BLE001 - any failure to read means "cannot tell"
        return None


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # file systems without hard links
        shutil.copyfile(src, dst)


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")
