"""Checkpoints of state that lives in pieces across the ranks, through torch.distributed.checkpoint.

Mode fsdp keeps a shard of every parameter and of its optimizer state on each rank. Such a
part is saved by every rank at once, each writing its own file (DCP), into a folder beside
the step file that the main worker writes as for every other mode:

    checkpoints/step_00000024.pt       position, schedule, RNG, metrics, config; "sharded" names:
    checkpoints/step_00000024/         .metadata  __0_0.distcp  __1_0.distcp  (one file per rank)

A step is valid only once complete: every rank's file is written and flushed, then the
coordinator's `.metadata`, then the folder (written under a hidden temporary name, removed when
a write fails) is renamed into place, then the step file; a folder that lacks a rank file
`.metadata` lists, or holds less, makes its step damaged (skipped for the previous one). Loading
reads the pieces each rank's current shards need: another number of workers re-shards on load.
The ZeRO optimizer's pieces are gathered onto the main rank, which saves them in the step file.

`load_model_state_dict` reads a model's plain state_dict from a checkpoint of any mode.
"""

from __future__ import annotations

import functools
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from common.errors import UserError, outside, unwrapped
from common.files import atomic_write, fsync_folder
from train.dist import DistContext
from train.run.planted import full_disk_writer

SHARDED_KEY = "sharded"  # in a step file: the name of its DCP folder beside it
VALUES_KEY = "sharded_values"  # in a step file: what the sharded parts hold besides tensors
STEP_FOLDER = re.compile(r"^step_\d{8}$")
RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


class Sharded(Protocol):
    """A part in pieces: `state_dict()` holds DTensors of this rank's shards, and is called on
    every rank alike; it may define `full_state_dict()` (every rank calls it; the main rank
    gets the plain, whole state_dict, or None when the part should not be gathered)."""

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ShardedParts:
    """The checkpointer's side for parts in pieces: DCP folders, and gathering for last.pt."""

    def __init__(self, folder: Path, ctx: DistContext, parts: Mapping[str, Sharded]):
        self.folder, self.ctx, self.parts = folder, ctx, dict(parts)

    @staticmethod
    def consolidate(parts: Mapping[str, Any]) -> None:
        """Every rank sends its pieces of the parts that can gather themselves onto the main
        rank (ZeroRedundancyOptimizer), whose `state_dict()` is then whole. A collective."""
        for part in parts.values():
            if hasattr(part, "consolidate_state_dict"):
                part.consolidate_state_dict(to=0)

    def save(self, step: int, full_disk: bool = False) -> dict[str, Any] | None:
        """Every rank writes its pieces into step_<step>/ (a collective). What the step file
        must hold for them (the folder's name, the parts' values that are no tensors), or None
        when there are no parts in pieces. `full_disk`: planted, the last rank's write fails."""
        if not self.parts:
            return None
        import torch.distributed.checkpoint as dcp

        name = f"step_{step:08d}"
        pending = self.folder / f".{name}.tmp"
        if self.ctx.is_main:
            shutil.rmtree(pending, ignore_errors=True)  # left over by a crash
            pending.mkdir(parents=True)
        if self.ctx.distributed:
            dist.barrier()  # no rank writes into the folder before it is clean
        tensors, values = split({key: part.state_dict() for key, part in self.parts.items()})
        # sync_files: each rank flushes its file; `.metadata` is written last, by the
        # coordinator, once every rank has written (dcp.save returns after that on every rank).
        planted = full_disk and self.ctx.rank == self.ctx.world_size - 1
        try:  # a failed write raises DCP's CheckpointException on every rank: its cause here
            dcp.save(tensors, storage_writer=full_disk_writer(pending, self.ctx.rank) if planted
                     else dcp.FileSystemWriter(pending, sync_files=True, thread_count=1))
        except BaseException as exc:  # noqa: BLE001 - CheckpointException is no Exception
            raise (unwrapped(exc) or exc) from None
        if self.ctx.is_main:
            final = self.folder / name
            shutil.rmtree(final, ignore_errors=True)  # a damaged step's folder, saved again
            os.replace(pending, final)
            fsync_folder(self.folder)
        return {SHARDED_KEY: name, VALUES_KEY: values}

    def gather_whole(self) -> dict[str, Any]:
        """{key: plain state_dict} of the parts that gather themselves, on the main rank ({}
        elsewhere). A collective: every rank calls it."""
        whole = {}
        for key, part in self.parts.items():
            gather = getattr(part, "full_state_dict", None)
            value = gather() if gather is not None else None
            if value is not None and self.ctx.is_main:
                whole[key] = value
        return whole

    def publish(self, state: dict[str, Any], whole: dict[str, Any]) -> None:
        """The main rank: last.pt as the step `state` with the gathered parts in it whole (its
        `model` a plain state_dict, as every mode's last.pt has it), then old folders go."""
        if whole:
            atomic_write(self.folder / "last.pt", lambda p: torch.save({**state, **whole}, p))
        self.clean()

    def clean(self) -> None:
        """Remove the folders whose step file is gone (rotated away) and unfinished ones."""
        if not self.folder.is_dir():
            return
        for entry in self.folder.iterdir():
            orphan = STEP_FOLDER.match(entry.name) and not entry.with_suffix(".pt").exists()
            if entry.is_dir() and (orphan or entry.name.endswith(".tmp")):
                shutil.rmtree(entry, ignore_errors=True)

    def load(self, state: dict[str, Any]) -> None:
        """Read this rank's pieces from the step's folder into the parts (a collective): the
        pieces saved by another number of ranks are cut anew for this one."""
        name = state.get(SHARDED_KEY)
        if (name is None) != (not self.parts):
            held, wanted = ("whole", "in pieces") if name is None else ("in pieces", "whole")
            step_file = self.folder / f"step_{state['step']:08d}.pt"
            raise UserError(f"{step_file} holds the model and optimizer {held} (mode "
                            f"{state['config'].get('mode', 'ddp')}) and this mode keeps them "
                            f"{wanted}: it cannot resume it; set checkpoint.resume=false to "
                            f"start over, or keep the mode", agreed=True)
        if name is None:
            return
        import torch.distributed.checkpoint as dcp

        tensors, _ = split({key: part.state_dict() for key, part in self.parts.items()})
        dcp.load(tensors, storage_reader=safe_reader(self.folder / name))  # in place
        pieces = merge(tensors, state.get(VALUES_KEY, {}))
        for key, part in self.parts.items():
            part.load_state_dict(pieces[key])


def damage(step_file: Path, state: dict[str, Any]) -> str | None:
    """Why the sharded state of the step `state` (read from `step_file`) is incomplete."""
    name = state.get(SHARDED_KEY) if isinstance(state, dict) else None
    return None if name is None else folder_damage(step_file.parent / name)


def folder_damage(folder: Path) -> str | None:
    """Why a DCP folder cannot be read whole (None: every file its .metadata lists is there,
    at least as long as listed)."""
    if not folder.is_dir():
        return f"its sharded state {folder.name}/ is missing"
    if not (folder / ".metadata").is_file():
        return f"{folder.name}/ has no .metadata (its save did not finish)"
    try:
        metadata = safe_reader(folder).read_metadata()
    except Exception as exc:  # noqa: BLE001 - any failure to read means "damaged"
        return f"{folder.name}/.metadata cannot be read ({type(exc).__name__})"
    needed: dict[str, int] = {}  # file -> bytes it must hold
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0),
                                         info.offset + info.length)
    for file, size in sorted(needed.items()):
        path = folder / file
        match = RANK_FILE.match(file)
        whose = f"rank {match.group(1)}'s file {file}" if match else f"file {file}"
        if not path.is_file():
            return f"{folder.name}/ lacks {whose}"
        if path.stat().st_size < size:
            return f"{folder.name}/ has {whose} truncated ({path.stat().st_size} of {size} bytes)"
    return None


def load_model_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model's plain state_dict, on the CPU, from a checkpoint of any mode: a checkpoint
    file (any mode's step file or last.pt; mode fsdp's step files name the DCP folder that holds
    the model), a DCP folder itself, or a run folder (its checkpoints/last.pt)."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints" / "last.pt"
    if path.is_dir():
        return read_whole(path, only="model")["model"]
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    with outside(f"reading {path} as a checkpoint"):  # any unreadable file: one line
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state:
        return state["model"]
    if isinstance(state, dict) and SHARDED_KEY in state:
        return read_whole(path.parent / state[SHARDED_KEY], only="model")["model"]
    raise UserError(f"{path} holds no model state_dict")


def read_whole(folder: Path, only: str | None = None,
               values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every tensor of a DCP folder (or of its part `only`), read whole in this process (no
    process group) onto the CPU, nested as it was saved, with `values` (the step file's) merged
    in. A UserError when the folder is incomplete."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = Path(folder)
    problem = folder_damage(folder)
    if problem:
        raise UserError(f"{folder} is not a complete sharded checkpoint: {problem}")
    metadata = safe_reader(folder).read_metadata()
    tensors: dict[str, Any] = {}
    for key, meta in metadata.state_dict_metadata.items():
        where = metadata.planner_data.get(key, (key,))  # the nested keys the flat key stands for
        if isinstance(meta, TensorStorageMetadata) and only in (None, where[0]):
            node = tensors
            for part in where[:-1]:
                node = node.setdefault(part, {})
            node[where[-1]] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if only is not None and only not in tensors:
        raise UserError(f"{folder} holds no {only}")
    with warnings.catch_warnings():  # "assuming ... a single process": just what is meant
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        with outside(f"reading the sharded checkpoint {folder}", "a file in it is damaged"):
            dcp.load(tensors, storage_reader=safe_reader(folder), no_dist=True)
    return merge(tensors, values or {})


def split(tree: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the tensors of a nested dict, everything else), both nested as in `tree`. Only tensors
    go to DCP (which reads its other entries back with `torch.load(weights_only=False)`); the
    rest (the optimizer's hyperparameters) goes into the step file, read with weights_only."""
    tensors: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            inner_tensors, inner_values = split(value)
            if inner_tensors:
                tensors[key] = inner_tensors
            if inner_values or not inner_tensors:  # keep empty dicts too
                values[key] = inner_values
        elif isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            values[key] = value
    return tensors, values


def merge(tensors: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `split`."""
    out = dict(values)
    for key, value in tensors.items():
        out[key] = merge(value, out.get(key, {})) if isinstance(value, dict) else value
    return out


# What a DCP .metadata may name: DCP's own records, tensor shapes and dtypes, paths.
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",
                     "torch.distributed.checkpoint.filesystem")
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                     ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
                     ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Decided before anything is imported: only torch and DCP's modules are looked into.
        known = module in _METADATA_MODULES or module == "torch" or (
            (module, name) in _METADATA_GLOBALS)
        found = super().find_class(module, name) if known and "." not in name else None
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(
                found, torch.dtype)) or (module in _METADATA_MODULES and isinstance(found, type)):
            return found
        raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint's .metadata")


def safe_reader(path: Path | str) -> Any:
    """DCP's file reader, but `.metadata` (a pickle) may name only DCP's records, shapes, dtypes
    and paths: a checkpoint folder never runs code when it is read. (torch.distributed.
    checkpoint takes a second to import: only runs that shard pay for it.)"""
    return _safe_reader_class()(path)


@functools.cache
def _safe_reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            with open(Path(self.path) / ".metadata", "rb") as file:
                metadata = _MetadataUnpickler(file).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader
