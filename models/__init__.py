"""Plain `nn.Module`s picked by name. Nothing here knows about devices or parallelism."""

from collections.abc import Callable

from torch import nn

from models.lenet import LeNet
from models.resnet import resnet18

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet": LeNet,
    "resnet18": resnet18,
}


def build_model(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Build a registered model for inputs of shape (in_channels, image_size, image_size)."""
    return MODELS[name](in_channels=in_channels, num_classes=num_classes, image_size=image_size)


__all__ = ["MODELS", "LeNet", "build_model", "resnet18"]
