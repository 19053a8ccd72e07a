"""Models by name: the book's (`lenet`, `resnet18`), any torchvision classification builder
(`torchvision.resnet50`), timm's (`timm.<name>`, when timm is installed) and a user's callable
(`python:my_pkg.models:build`). Nothing here knows about devices or parallelism.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable

from torch import nn

from common.errors import UserError, outside
from models.lenet import LeNet
from models.pretrained import torchvision_model
from models.resnet import resnet18

BOOK: dict[str, Callable[..., nn.Module]] = {"lenet": LeNet, "resnet18": resnet18}
TORCHVISION, TIMM, PYTHON = "torchvision.", "timm.", "python:"


def torchvision_names() -> list[str]:
    """torchvision's classification builders (not detection, segmentation or video)."""
    from torchvision import models

    return [TORCHVISION + name for name in models.list_models(module=models)]


def timm_names() -> list[str]:
    """timm's models, or none when timm is not installed."""
    try:
        import timm
    except ImportError:
        return []
    return [TIMM + name for name in timm.list_models()]


def known_names() -> list[str]:
    return [*BOOK, *torchvision_names(), *timm_names()]


def unknown(name: str, names: list[str] | None = None) -> UserError:
    """model.name is not a model: say so with the closest names."""
    names = known_names() if names is None else names
    close = []
    if "." not in name and not name.startswith(PYTHON):  # resnet50: torchvision.resnet50?
        close = difflib.get_close_matches(TORCHVISION + name, names, n=2, cutoff=0.8)
    close += difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    close = list(dict.fromkeys(close))[:3]
    hint = f"; did you mean {', '.join(close)}?" if close else (
        "; names: lenet, resnet18, torchvision.<builder>, timm.<name>, python:module:callable")
    return UserError(f"model.name={name!r} is not a model{hint}")


def check_name(name: str) -> None:
    """Raise the one-line error for a name that cannot be built (no model is built)."""
    if name in BOOK:
        return
    if name.startswith(TORCHVISION):
        if name not in torchvision_names():
            raise unknown(name)
    elif name.startswith(TIMM):
        names = timm_names()
        if not names:
            raise UserError(f"model.name={name} needs timm, which is not installed "
                            f"(pip install timm)")
        if name not in names:
            raise unknown(name, names)
    elif name.startswith(PYTHON):
        python_builder(name)
    else:
        raise unknown(name)


def python_builder(name: str) -> Callable[..., nn.Module]:
    """`python:module:callable`, imported."""
    module_name, _, attr = name[len(PYTHON):].partition(":")
    if not module_name or not attr:
        raise UserError(f"model.name={name} must be python:module:callable, e.g. "
                        f"python:my_pkg.models:build")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"model.name={name}: cannot import {module_name} "
                        f"({type(exc).__name__}: {first})") from None
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise UserError(f"model.name={name}: {module_name} has no callable {attr}")
    return builder


def build(name: str, in_channels: int, num_classes: int, image_size: int,
          pretrained: bool = False) -> nn.Module:
    """The model `name` for images of `in_channels` x `image_size`^2 pixels and `num_classes`
    outputs; `pretrained`: torchvision's or timm's published weights (models/pretrained.py)."""
    check_name(name)
    if pretrained and (name in BOOK or name.startswith(PYTHON)):
        raise UserError(f"model.pretrained=true: {name} has no published weights; use "
                        f"model.init_from=<file> instead")
    if name in BOOK:
        return BOOK[name](in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    if name.startswith(PYTHON):
        builder = python_builder(name)
        with outside(f"the model builder model.name={name}"):
            model = builder(num_classes=num_classes, in_channels=in_channels,
                            image_size=image_size)
        if not isinstance(model, nn.Module):
            raise UserError(f"model.name={name} returned a {type(model).__name__}, not an "
                            f"nn.Module")
        return model
    if name.startswith(TIMM):
        import timm

        return timm.create_model(name[len(TIMM):], pretrained=pretrained,
                                 num_classes=num_classes, in_chans=in_channels)

    return torchvision_model(name[len(TORCHVISION):], in_channels, num_classes, pretrained)
