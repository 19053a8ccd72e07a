"""`data.decoder=nvjpeg` (GPUs, image folders on the stream path without the decoded cache):
loader processes only read the files' bytes; the worker decodes each batch on its GPU with
torchvision.io's nvjpeg batch decoder, then renders the views there.

Files that are not JPEG (PNG, ...) and JPEGs nvjpeg refuses are decoded on the CPU by
torchvision.io instead; a file neither can decode is a bad file, as on the PIL path.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torchvision.io as tvio

from train.data.augment import Augment
from train.data.crops import render_batch
from train.data.imagefolder import FileSet
from train.data.stream import Item, Raw

_JPEG = b"\xff\xd8"


class BytesReader(torch.utils.data.Dataset):
    """What a loader process computes for (epoch, index): the file's bytes, undecoded."""

    def __init__(self, samples: FileSet, augment: Augment, split: str):
        self.samples, self.augment, self.split, self.cache = samples, augment, split, None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> Item:
        _, index = key
        path = self.samples.paths[index]
        try:
            with warnings.catch_warnings():  # torchvision 0.29 points to torchcodec
                warnings.simplefilter("ignore")
                data = tvio.read_file(path)
        except (OSError, RuntimeError) as exc:
            return index, None, -1, f"{path} ({exc})", False
        return index, data, int(self.samples.labels[index]), "", False


def collate_bytes(items: list[Item]) -> Raw:
    """Like stream.collate, but the images stay a list of byte tensors of any length."""
    good = [it for it in items if it[1] is not None]
    bad = [(it[0], it[3], it[4]) for it in items if it[1] is None]
    return ([it[1] for it in good] or None,  # type: ignore[return-value]
            torch.tensor([it[2] for it in good], dtype=torch.long),
            torch.tensor([it[0] for it in good], dtype=torch.long), bad)


class NvjpegDecode:
    """Byte batch -> uint8 images [B, 3, S, S] on the GPU, rendered for the split, then the
    usual finish (normalization, memory format).

    The batch's labels and indices stay on the host (stream.ahead leaves byte batches there):
    the views are drawn from the indices on the host, so nothing here waits for the GPU."""

    def __init__(self, reader: BytesReader, device: torch.device, finish: Any):
        self.reader, self.device, self.finish = reader, device, finish
        self.cpu_decoded = 0  # files decoded on the CPU so far (not JPEG, or nvjpeg refused)

    def __call__(self, raw: Raw, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        blobs, labels, indices, bad = raw
        if blobs is not None:
            images, keep, failed = self._decode(blobs, indices)
            bad = bad + failed
            if len(keep) < len(blobs):  # a few files failed: the rest of the batch goes on
                labels, indices = self._pinned(labels[keep]), self._pinned(indices[keep])
            blobs = self._render(images, indices, epoch) if images else None
            if blobs is not None and self.reader.split == "train" and \
                    self.reader.augment.name == "cifar":
                blobs = self.reader.augment.shift(
                    blobs, indices.to(self.device, non_blocking=True), epoch)
        return self.finish((blobs, labels, indices, bad), epoch)

    def _pinned(self, tensor: torch.Tensor) -> torch.Tensor:
        # Pinned, its later copy to the GPU is queued rather than waited for.
        return tensor.pin_memory() if self.device.type == "cuda" else tensor

    def _decode(self, blobs: list[torch.Tensor],
                indices: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, list]:
        """(decoded images in batch order, their positions in the batch, bad files)."""
        jpegs = [i for i, b in enumerate(blobs) if bytes(b[:2].tolist()) == _JPEG]
        decoded: dict[int, torch.Tensor] = {}
        with warnings.catch_warnings():  # deprecated for torchcodec, which has no nvjpeg batch
            warnings.simplefilter("ignore")
            self._decode_jpegs(blobs, jpegs, decoded)
            failed = []
            for i, blob in enumerate(blobs):
                if i in decoded:
                    continue
                self.cpu_decoded += 1
                try:
                    decoded[i] = self._pinned(tvio.decode_image(
                        blob, mode=tvio.ImageReadMode.RGB)).to(self.device, non_blocking=True)
                except RuntimeError as exc:
                    index = int(indices[i])
                    failed.append((index, f"{self.reader.samples.paths[index]} ({exc})", False))
        order = sorted(decoded)
        return [decoded[i] for i in order], torch.tensor(order, dtype=torch.long), failed

    def _decode_jpegs(self, blobs: list[torch.Tensor], which: list[int],
                      decoded: dict[int, torch.Tensor]) -> None:
        """nvjpeg's batch decode of `which`; a batch it refuses (one CMYK or broken file fails
        them all) is halved until the files it refuses are alone: they go to the CPU, the
        rest stays on the GPU (about 2 log2(B) decodes per refused file)."""
        if not which:
            return
        try:
            out = tvio.decode_jpeg([blobs[i] for i in which], mode=tvio.ImageReadMode.RGB,
                                   device=self.device)
        except RuntimeError:
            if len(which) > 1:
                half = len(which) // 2
                self._decode_jpegs(blobs, which[:half], decoded)
                self._decode_jpegs(blobs, which[half:], decoded)
            return
        decoded.update(zip(which, out, strict=True))

    def _render(self, images: list[torch.Tensor], indices: torch.Tensor,
                epoch: int) -> torch.Tensor:
        """The split's view of each image, drawn on the host from its index, rendered as one
        batch (train/data/crops.py)."""
        aug, views = self.reader.augment, []
        for image, index in zip(images, indices.tolist(), strict=True):
            h, w = image.shape[-2:]
            if self.reader.split == "train":
                views.append(aug.train_view(w, h, epoch, index))
            else:
                views.append(aug.eval_view(w, h))
        return render_batch(images, views)
