"""Plain `nn.Module`s picked by name. Nothing here knows about devices or parallelism."""

from collections.abc import Callable

from torch import nn

from models.catalog import BOOK, build, check_name, known_names
from models.lenet import LeNet
from models.resnet import resnet18

MODELS: dict[str, Callable[..., nn.Module]] = BOOK  # the book's, by name


def build_model(name: str, in_channels: int, num_classes: int, image_size: int,
                init: str = "torch", pretrained: bool = False) -> nn.Module:
    """Build model `name` (models/catalog.py) for inputs of shape (in_channels, image_size,
    image_size).

    init (the book's models only; others keep their builder's initialization) "book": weights
    drawn from N(0, 0.01^2) as in the book (LeNet then needs a few hundred steps before it
    starts to learn); "torch": PyTorch's default initialization.
    """
    model = build(name, in_channels, num_classes, image_size, pretrained)
    if init == "torch" and name in BOOK:
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.reset_parameters()
    return model


__all__ = ["MODELS", "LeNet", "build_model", "check_name", "known_names", "resnet18"]
