"""`data.name=python data.factory=my_pkg.data:build`: the user's own map-style Datasets.

The factory is called with no arguments and returns (train, test): two
`torch.utils.data.Dataset`s with `__len__` and `__getitem__`, each sample an (image, label)
pair. Images: PIL images, uint8 tensors or arrays (CHW, or HWC), or float tensors in [0, 1];
labels: integers. The classes come from the train set's `classes` (a list of names, as
torchvision's datasets have), else from its `targets`, else from one pass over its labels.
"""

from __future__ import annotations

import importlib
import logging
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch

from common.errors import UserError, outside
from common.schema import DataConfig
from train.data.decode import as_image, image_size, render_any
from train.data.imagefolder import BadSample

log = logging.getLogger(__name__)


def call_factory(cfg: DataConfig) -> tuple[Any, Any]:
    """Import and call `data.factory`; UserError for each way it can go wrong."""
    spec = cfg.factory
    module_name, sep, attr = spec.partition(":")
    if not spec or not sep or not module_name or not attr:
        raise UserError(f"data.name=python needs data.factory=module:callable (e.g. "
                        f"my_pkg.data:build); got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - the user's module may fail in any way
        raise UserError(f"data.factory {spec}: cannot import {module_name} "
                        f"({type(exc).__name__}: {exc}); is it on PYTHONPATH?") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise UserError(f"data.factory {spec}: {module_name} has no {attr}")
    if not callable(fn):
        raise UserError(f"data.factory {spec} is not callable (a {type(fn).__name__})")
    with outside(f"the dataset factory data.factory={spec}"):
        result = fn()
    if not (isinstance(result, (tuple, list)) and len(result) == 2
            and all(_is_dataset(d) for d in result)):
        raise UserError(f"data.factory {spec} must return (train, test): two map-style "
                        f"Datasets (with __len__ and __getitem__); got {_describe(result)}")
    return result[0], result[1]


def _is_dataset(obj: Any) -> bool:
    return hasattr(obj, "__getitem__") and hasattr(obj, "__len__")


def _describe(obj: Any) -> str:
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)}: " + ", ".join(
            type(x).__name__ for x in obj[:3])
    return f"a {type(obj).__name__}"


@dataclass
class PythonSet:
    """One split of the user's dataset, as the stream path and materialization read it."""

    dataset: Any
    split: str  # "train" or "test", for messages
    classes: list[str]
    channels: int
    spec: str  # data.factory, for messages
    labels: torch.Tensor | None = field(default=None)  # when the dataset tells them

    def __len__(self) -> int:
        return len(self.dataset)

    def describe(self, index: int) -> str:
        return f"data.factory {self.spec}: {self.split} sample {index}"

    def item(self, index: int) -> tuple[Any, int]:
        """(image, label) of sample `index`, checked; UserError for a malformed sample."""
        where = self.describe(index)
        try:
            sample = self.dataset[index]
        except Exception as exc:  # noqa: BLE001 - the user's __getitem__
            raise BadSample(where, f"{type(exc).__name__}: {exc}") from None
        if not (isinstance(sample, (tuple, list)) and len(sample) == 2):
            raise UserError(f"{where} is {_describe(sample)}, not an (image, label) pair")
        image, label = sample
        if isinstance(label, torch.Tensor) and label.numel() == 1:
            label = label.item()
        if not isinstance(label, numbers.Integral) or isinstance(label, bool):
            raise UserError(f"{where}: the label must be an integer class index; got "
                            f"{type(label).__name__} {label!r}")
        if not 0 <= label < len(self.classes):
            raise UserError(f"{where}: label {label} is outside 0..{len(self.classes) - 1} "
                            f"({len(self.classes)} classes)")
        try:
            image = as_image(image)
        except ValueError as exc:
            raise UserError(f"{where}: {exc}") from None
        return self._channels(image), int(label)

    def _channels(self, image: Any) -> Any:
        if isinstance(image, torch.Tensor):
            if image.shape[0] == self.channels:
                return image
            if image.shape[0] == 1:
                return image.expand(self.channels, -1, -1)
            raise UserError(f"data.factory {self.spec}: {self.split} images mix 1 and 3 "
                            f"channels; give them all the same")
        return image.convert("RGB" if self.channels == 3 else "L")

    def load(self, index: int, view_of: Any) -> tuple[torch.Tensor, int]:
        image, label = self.item(index)
        return render_any(image, view_of(*image_size(image))).contiguous(), label


def open_python(cfg: DataConfig) -> tuple[PythonSet, PythonSet]:
    """The factory's (train, test), with their first samples checked."""
    train, test = call_factory(cfg)
    # The user's __len__, __getitem__ and targets, asked before a PythonSet wraps them.
    with outside(f"the datasets of data.factory={cfg.factory}"):
        return _checked(cfg, train, test)


def _checked(cfg: DataConfig, train: Any, test: Any) -> tuple[PythonSet, PythonSet]:
    if len(train) == 0 or len(test) == 0:
        raise UserError(f"data.factory {cfg.factory}: the {'train' if len(train) == 0 else 'test'}"
                        f" set is empty")
    probe = PythonSet(train, "train", [], 3, cfg.factory)
    first = probe.dataset[0]
    if not (isinstance(first, (tuple, list)) and len(first) == 2):
        raise UserError(f"data.factory {cfg.factory}: train sample 0 is {_describe(first)}, not "
                        f"an (image, label) pair")
    try:
        image = as_image(first[0])
    except ValueError as exc:
        raise UserError(f"data.factory {cfg.factory}: train sample 0: {exc}") from None
    channels = 1 if (image.shape[0] == 1 if isinstance(image, torch.Tensor)
                     else image.mode in ("L", "1", "I", "F")) else 3
    classes = _classes(train)
    if len(classes) < 2:
        raise UserError(f"data.factory {cfg.factory}: the train set has one class: a classifier "
                        f"of one class is always right and learns nothing")
    sets = (PythonSet(train, "train", classes, channels, cfg.factory),
            PythonSet(test, "test", classes, channels, cfg.factory))
    for s in sets:  # every split's first sample in full: the same checks as in training
        s.item(0)
    return sets


def _classes(train: Any) -> list[str]:
    names = getattr(train, "classes", None)
    if isinstance(names, (list, tuple)) and names:
        return [str(n) for n in names]
    targets = getattr(train, "targets", None)
    if targets is not None and len(targets):
        return [str(i) for i in range(int(max(int(t) for t in targets)) + 1)]
    log.info("counting the classes of data.factory's train set: one pass over its %d samples "
             "(give the Dataset a `classes` list to skip it)", len(train))
    labels = [int(train[i][1]) for i in range(len(train))]
    return [str(i) for i in range(max(labels) + 1)]
