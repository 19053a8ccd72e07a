"""The decoded cache (`data.cache=decoded`): each image decoded once, at a fixed size, into a
uint8 file that is memory-mapped and gathered by index (the idea behind FFCV's files).

One file per node and split, shared by the node's workers and their loader processes:

    header (64 bytes) | flags int32 [N] | labels int64 [N] | images uint8 [N, C, S, S]

A slot is filled by whichever process decodes the image first; its flag then says when: in
pass t (0: before training, as the memory path fills it; e + 1: in epoch e), stored as t + 1,
negated for a file that could not be decoded. A reader trusts a slot only when it was filled
before the current epoch: that fill happened before the collectives that separate epochs, so
its bytes are visible to every process of the node (on any CPU's memory ordering), and a
restart inside an epoch redoes the slots of that epoch. At every epoch start the file is
flushed to disk and the header records up to which pass it is durable: a node that lost power
distrusts what came later.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import UserError, outside

_MAGIC = b"DPTRDEC1"
_HEADER = 64
_ALIGN = 4096


def cache_folder(cache_dir: str) -> Path:
    """`data.cache_dir`, or the system's temp folder (node-local on most clusters)."""
    return Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "dptrain-cache"


def cache_path(cache_dir: str, fingerprint: Any) -> Path:
    """The file for a split: named after what it holds and the node (one writer node each)."""
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode())
    return cache_folder(cache_dir) / f"{socket.gethostname()}-{digest.hexdigest()[:20]}.u8"


class DecodedFile:
    """N uint8 images [C, S, S] and their fill flags in one memory-mapped file."""

    def __init__(self, path: Path, count: int, shape: tuple[int, int, int]):
        self.path, self.count, self.shape = path, count, tuple(shape)
        self.flags_at = _HEADER
        self.labels_at = -(-(_HEADER + 4 * count) // 8) * 8
        self.images_at = -(-(self.labels_at + 8 * count) // _ALIGN) * _ALIGN
        self.size = self.images_at + count * int(np.prod(shape))
        self._pid: int | None = None
        self._create_or_check()
        self._distrust_undurable()

    def _create_or_check(self) -> None:
        if self.path.is_file() and self.path.stat().st_size == self.size:
            header = _read_head(self.path)
            if header[:8] == _MAGIC and _ints(header)[:4] == [self.count, *self.shape]:
                return
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(folder).free
        except OSError as exc:
            raise UserError(f"data.cache_dir {folder} cannot be created ({exc.strerror})") from None
        if free < self.size:
            raise UserError(f"the decoded cache needs {self.size / 2**30:.1f} GiB in {folder} "
                            f"but {free / 2**30:.1f} GiB are free; set data.cache_dir to a "
                            f"larger disk, or data.cache=none")
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with outside(f"creating the decoded cache {self.path} (data.cache_dir)"):
            with tmp.open("wb") as f:
                f.write(_MAGIC + np.array([self.count, *self.shape, 0], np.int64).tobytes())
                f.truncate(self.size)  # sparse: blocks are allocated as slots are filled
            os.replace(tmp, self.path)  # another process of the node may have won: the same

    def _maps(self) -> tuple[np.memmap, np.memmap, np.memmap]:
        """The mappings of this process (a loader process forked from a worker opens its own)."""
        if self._pid != os.getpid():
            self._header = np.memmap(self.path, np.int64, "r+", 8, (5,))
            self._flags = np.memmap(self.path, np.int32, "r+", self.flags_at, (self.count,))
            self._labels = np.memmap(self.path, np.int64, "r+", self.labels_at, (self.count,))
            self._images = np.memmap(self.path, np.uint8, "r+", self.images_at,
                                     (self.count, *self.shape))
            self._pid = os.getpid()
        return self._header, self._flags, self._images

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_header", "_flags", "_labels", "_images"):
            state.pop(key, None)
        state["_pid"] = None
        return state

    def _distrust_undurable(self) -> None:
        header, flags, _ = self._maps()
        durable = int(header[4])
        flags[np.abs(flags) > durable] = 0  # filled in a pass that never reached the disk

    # --- slots -------------------------------------------------------------------------------

    def state(self, index: int, epoch: int) -> int:
        """1: a trusted image, -1: a trusted bad file, 0: to decode (in epoch `epoch`)."""
        flag = int(self._maps()[1][index])
        if flag == 0 or abs(flag) > epoch + 1:
            return 0
        return 1 if flag > 0 else -1

    def untrusted(self, indices: torch.Tensor, epoch: int) -> int:
        """How many of `indices` a reader would have to decode in epoch `epoch`."""
        flags = np.abs(self._maps()[1][indices.numpy()])
        return int(((flags == 0) | (flags > epoch + 1)).sum())

    def untrusted_all(self) -> list[int]:
        """Slots not filled (or not durably): what a fill before training decodes."""
        return np.nonzero(self._maps()[1] == 0)[0].tolist()

    def flag_values(self) -> torch.Tensor:
        """Every slot's flag: > 0 an image, < 0 a bad file, 0 empty."""
        return torch.from_numpy(np.array(self._maps()[1]))

    def read(self, index: int) -> tuple[torch.Tensor, int]:
        """A trusted slot's image and label."""
        _, _, images = self._maps()
        return torch.from_numpy(np.array(images[index])), int(self._labels[index])

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, C, S, S] and labels of trusted slots `indices` (copies)."""
        _, _, images = self._maps()
        picked = indices.numpy()
        return (torch.from_numpy(np.asarray(images[picked])),
                torch.from_numpy(np.asarray(self._labels[picked])))

    def write(self, index: int, image: torch.Tensor | None, label: int, epoch: int) -> None:
        """Fill a slot in epoch `epoch` (-1: before training); None marks a bad file."""
        _, flags, images = self._maps()
        mark = epoch + 2  # pass t = epoch + 1, stored as t + 1
        if image is not None:
            images[index] = image.numpy()
        self._labels[index] = label
        flags[index] = mark if image is not None else -mark  # after the bytes

    def make_durable(self, epoch: int) -> None:
        """Called at the start of epoch `epoch` (and with 0 after filling before training):
        flush, then record that the slots filled before that epoch are on disk."""
        header, flags, images = self._maps()
        images.flush()
        self._labels.flush()
        flags.flush()
        header[4] = max(int(header[4]), epoch + 1)
        header.flush()


def _read_head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(_HEADER)


def _ints(header: bytes) -> list[int]:
    return np.frombuffer(header[8:48], dtype=np.int64).tolist()
