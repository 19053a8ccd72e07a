"""Plain `nn.Module`s picked by name. Nothing here knows about devices or parallelism."""

from collections.abc import Callable

from torch import nn

from models.lenet import LeNet
from models.resnet import resnet18

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet": LeNet,
    "resnet18": resnet18,
}


def build_model(name: str, in_channels: int, num_classes: int, image_size: int,
                init: str = "torch") -> nn.Module:
    """Build a registered model for inputs of shape (in_channels, image_size, image_size).

    init "book": weights drawn from N(0, 0.01^2) as in the book (LeNet then needs a few
    hundred steps before it starts to learn); "torch": PyTorch's default initialization.
    """
    model = MODELS[name](in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    if init == "torch":
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.reset_parameters()
    return model


__all__ = ["MODELS", "LeNet", "build_model", "resnet18"]
