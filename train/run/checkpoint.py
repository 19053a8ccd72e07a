"""Full-state checkpoints: the checkpointer pulls `state_dict()`s from the run's parts (as
torchtitan's does), the main worker writes them atomically, every rank can read them back.

`checkpoints/step_00000123.pt` holds everything needed to continue bitwise: model, optimizer,
LR scheduler, AMP scaler, position (epoch, step, batch inside the epoch), every rank's own
parts (RNG states, running metrics, sync state), the config's identity and the world size.
Each file has a `.sha256` beside it; `last.pt` is the newest one (a hard link, so it costs no
second write). Loading uses `weights_only=True` (no arbitrary unpickling) and the CPU: each
part's `load_state_dict` puts tensors where they belong.

Every write is durable before the next begins (step file -> .sha256 -> last.pt, each through a
temp file that is flushed to the disk and renamed): a crash or power loss at any moment leaves
the previous checkpoint valid. A write that fails (a full disk) removes what it wrote, and
every rank learns of it: they stop together with one line naming the last valid checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from common.errors import UserError
from common.files import atomic_write, write_failure
from train.dist import DistContext, agree
from train.run.sharded import Sharded, ShardedParts, damage

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
    `load_other_world(states)` for a resume with another number of workers. `sharded` parts
    are in pieces across the ranks (FSDP's model and optimizer): every rank saves its pieces
    into a folder beside the step file (train/run/sharded.py).
    """

    def __init__(self, files: Checkpoints, ctx: DistContext, parts: Mapping[str, Stateful],
                 rank_parts: Mapping[str, Stateful], identity: dict[str, Any],
                 sharded: Mapping[str, Sharded] | None = None):
        self.files, self.ctx, self.identity = files, ctx, identity
        self.parts, self.rank_parts = dict(parts), dict(rank_parts)
        self.sharded = ShardedParts(files.folder, ctx, sharded or {})
        self.last_saved: str | None = None  # the newest file this process wrote (main worker)

    def save(self, final: bool = False) -> Path | None:
        """Every rank contributes its own parts; the main worker writes the file, and every rank
        learns whether it could (a full disk stops them all together). `final`: the run's last
        checkpoint, where parts in pieces are also gathered whole into last.pt."""
        ShardedParts.consolidate(self.parts)
        step = self.parts["position"].state_dict()["step"]
        try:
            pieces = self.sharded.save(step, full_disk=step == self.files.fill_disk_at)
        except OSError as exc:  # DCP's write failed on some rank, and raised on every rank
            if self.ctx.is_main:
                self.sharded.clean()  # the step's unfinished folder
            raise write_failure(exc, f"step {step}", self.files.folder.parent,
                                self.files.newest_complete(), agreed=True) from None
        whole = self.sharded.gather_whole() if final else {}
        # On the CPU before gathering: rank 0 would unpickle every rank's CUDA tensors onto
        # that rank's GPU (a CUDA context and memory on every GPU of the node).
        mine = {k: on_cpu(v) for k, part in self.rank_parts.items()
                if (v := part.state_dict()) is not None}
        ranks: list[Any] | None = [mine]
        if self.ctx.distributed:
            # Only the main worker writes: gather to it alone (error feedback can be as large
            # as the gradients).
            ranks = [None] * self.ctx.world_size if self.ctx.is_main else None
            dist.gather_object(mine, ranks, dst=0)
        return agree(self.ctx, lambda: self._write(ranks, pieces, whole) if self.ctx.is_main
                     else None)

    def _write(self, ranks: list[Any], pieces: dict[str, Any] | None,
               whole: dict[str, Any]) -> Path:
        # On the CPU: a file of CUDA tensors cannot be opened by a bare torch.load on a machine
        # without that GPU. torch.save copies each tensor to the host anyway.
        state: dict[str, Any] = {}
        for key, part in self.parts.items():
            if key in FLAT_PARTS:
                state.update(on_cpu(part.state_dict()))
            else:
                state[key] = on_cpu(part.state_dict())
        state.update(ranks=ranks, world_size=self.ctx.world_size, config=self.identity)
        if pieces is None:
            path = self.files.save(state)
        else:
            state.update(pieces)  # the folder's name, what the parts hold besides tensors
            path = self.files.save(state)
            self.sharded.publish(state, whole)
        self.last_saved = str(path)
        return path

    def restore(self, state: dict[str, Any]) -> None:
        """Give every part its state back (already checked: same run, allowed world size)."""
        self.sharded.load(state)
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


def on_cpu(state: Any) -> Any:
    """`state` with every tensor in it (in dicts, lists, tuples) copied to the CPU."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: on_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(on_cpu(v) for v in state)
    return state


class Checkpoints:
    """The checkpoint files of one run folder (the main worker writes; every rank may read)."""

    def __init__(self, folder: Path, keep: int, fill_disk_at: int = 0,
                 slow_from: tuple[int, float] = (0, 0.0)):
        self.folder = folder
        self.keep = keep
        self.fill_disk_at = fill_disk_at  # debug.disk_full_step: a planted full disk
        self.slow_from = slow_from  # debug.slow_save_step/seconds: a planted slow disk
        self.best: Any = None  # checkpoint.keep_best's keeper (train/run/best.py): kept, linked

    def save(self, state: dict[str, Any]) -> Path:
        """Write `state` as step_<step>.pt (+ .sha256), point last.pt at it, drop old ones.

        Each write is durable before the next one starts: a crash at any moment leaves the
        previous checkpoint valid (a step file without its .sha256 is still read and checked
        by unpickling). A failed write removes this step's files: WriteFailed names the last
        valid checkpoint."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for leftover in self.folder.glob(".*.tmp"):  # of a crash: only this worker writes here
            leftover.unlink(missing_ok=True)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        blob = buffer.getvalue()
        path = self.folder / f"step_{state['step']:08d}.pt"
        try:
            atomic_write(path, lambda p: self._write_blob(p, blob, state["step"]))
            atomic_write(_digest_path(path),
                         lambda p: p.write_text(hashlib.sha256(blob).hexdigest()))
            atomic_write(self.folder / "last.pt", lambda p: _link_or_copy(path, p))
        except OSError as exc:
            # last.pt is renamed into place last: it still names the previous checkpoint.
            _digest_path(path).unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            raise write_failure(exc, f"step {state['step']}", self.folder.parent,
                                self.newest_complete()) from None
        if self.best is not None:
            try:
                self.best.after_save(_link_or_copy)
            except OSError as exc:
                raise write_failure(exc, "best.pt", self.folder.parent,
                                    self.newest_complete()) from None
        self._rotate()
        return path

    def _write_blob(self, tmp: Path, blob: bytes, step: int) -> None:
        with tmp.open("wb") as f:
            if step == self.fill_disk_at:  # planted: the disk fills up half-way through
                f.write(blob[:len(blob) // 2])
                f.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
            if 0 < self.slow_from[0] <= step:  # planted: a write slower than a grace period
                f.write(blob[:len(blob) // 2])
                f.flush()
                time.sleep(self.slow_from[1])
                blob = blob[len(blob) // 2:]
            f.write(blob)

    def candidates(self) -> list[Path]:
        """Step checkpoints, newest first."""
        if not self.folder.is_dir():
            return []
        steps = [p for p in self.folder.iterdir() if STEP_FILE.match(p.name)]
        return sorted(steps, key=lambda p: p.name, reverse=True)

    def newest_complete(self) -> int | None:
        """The step of the newest checkpoint whose .sha256 is written (the sidecar is written
        only once the step file is whole and on the disk); None when there is none."""
        for path in self.candidates():
            if _digest_path(path).is_file():
                return step_of(path)
        return None

    def peek_latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that opens, without reading its tensors (memory-mapped): its
        position, world size and config, for the launcher's checks. The digest is not checked
        (the workers check it)."""
        for path in self.candidates():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # noqa: BLE001 - any failure to read means "damaged"
                continue
            return path, {k: state[k] for k in ("config", "world_size", "epoch", "step",
                                                 "batch_in_epoch")}
        return None

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
            raise self.none_valid()
        return None

    def none_valid(self) -> UserError:
        return UserError(f"no valid checkpoint in {self.folder} ({len(self.candidates())} "
                         f"damaged); set checkpoint.resume=false to start over, or move them "
                         f"away")

    def _rotate(self) -> None:
        kept = self.best.protected() if self.best is not None else None
        for old in self.candidates()[self.keep:]:
            if old.name == kept:  # the best epoch's (its fsdp folder stays with it)
                continue
            # The sidecar first: a crash in between leaves a step file that is read and
            # checked by unpickling, and removed by the next rotation; never a lone sidecar.
            _digest_path(old).unlink(missing_ok=True)
            old.unlink(missing_ok=True)


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
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read means "damaged"
        lines = str(exc).strip().splitlines()
        raise CorruptCheckpoint((lines[0] if lines else type(exc).__name__)[:200]) from None
    problem = damage(path, state)  # mode fsdp: the folder of every rank's pieces beside it
    if problem:
        raise CorruptCheckpoint(problem)
    return state


def step_of(path: Path) -> int:
    """The step a checkpoint file was written at, from its name."""
    return int(STEP_FILE.match(path.name).group(1))


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # file systems without hard links
        shutil.copyfile(src, dst)


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")
