"""torchvision models: built without weights, or with torchvision's published weights (read
from the torch hub cache, downloaded there first when the machine can reach the internet)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from common.errors import UserError, outside

log = logging.getLogger(__name__)


def torchvision_model(builder: str, in_channels: int, num_classes: int,
                      pretrained: bool) -> nn.Module:
    """torchvision's `builder` with `num_classes` outputs; a 1-channel input is repeated to
    the 3 channels torchvision's models take (a pre-hook, so the keys stay torchvision's)."""
    from torchvision import models

    if in_channels not in (1, 3):
        raise UserError(f"torchvision.{builder} takes 3-channel images; the data has "
                        f"{in_channels} channels")
    model = models.get_model(builder, weights=None, num_classes=num_classes)
    if pretrained:
        load_published(model, builder)
    if in_channels == 1:
        model.register_forward_pre_hook(_gray_to_rgb)
    return model


def _gray_to_rgb(module: nn.Module, args: tuple) -> tuple:
    return (args[0].expand(-1, 3, -1, -1), *args[1:])


def weights_file(builder: str) -> tuple[str, str, Path]:
    """(the weights' name, their URL, where the torch hub cache keeps them)."""
    from torchvision import models

    weights = models.get_model_weights(builder).DEFAULT
    return str(weights), weights.url, Path(torch.hub.get_dir()) / "checkpoints" / Path(
        weights.url).name


def fetch_published(builder: str) -> Path:
    """The weights' file in the hub cache, downloaded when missing (one line when that fails)."""
    name, url, path = weights_file(builder)
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=False)
    except Exception as exc:  # noqa: BLE001 - no network, proxy, disk: the same advice
        path.unlink(missing_ok=True)
        raise UserError(f"model.pretrained=true: torchvision's {name} weights are not in the "
                        f"torch hub cache ({path}) and could not be downloaded from {url} "
                        f"({type(exc).__name__}); put the file there, or use "
                        f"model.init_from=<file>") from None
    return path


def load_published(model: nn.Module, builder: str) -> None:
    """Published weights into `model`; a classifier of another size keeps its fresh init
    (named in the log), as when fine-tuning ImageNet weights on fewer classes."""
    path = fetch_published(builder)
    # A file half-written by a download that was cut, or damaged since: torch's own error
    # ("failed finding central directory") would be a traceback from every rank.
    with outside(f"model.pretrained=true: reading torchvision's weights for {builder} from "
                 f"{path}", hint="delete the file (it is downloaded again) or put a whole "
                                 "copy there"):
        state = torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    fresh = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for key in fresh:
        del state[key]
    missing = model.load_state_dict(state, strict=False).missing_keys
    if sorted(missing) != sorted(fresh):
        raise UserError(f"model.pretrained=true: torchvision's weights for {builder} lack "
                        f"{', '.join(sorted(set(missing) - set(fresh))[:3])}")
    if fresh:
        log.info("pretrained %s: %s left at their initialization (another number of classes)",
                 builder, ", ".join(fresh))
