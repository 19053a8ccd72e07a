"""The book's ResNet-18 variant for small images: 3x3 stride-1 stem, no max-pool."""

import torch
from torch import nn
from torch.nn import functional as F


class Residual(nn.Module):
    """Two 3x3 convs with batch norm; a 1x1 conv on the shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, use_1x1conv: bool = False,
                 stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv3 = nn.Conv2d(in_channels, out_channels, 1, stride=stride) if use_1x1conv else None
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.conv3 is not None:
            x = self.conv3(x)
        return F.relu(y + x)


def _stage(in_channels: int, out_channels: int, first: bool) -> nn.Sequential:
    blocks = [Residual(in_channels, out_channels, use_1x1conv=not first, stride=1 if first else 2),
              Residual(out_channels, out_channels)]
    return nn.Sequential(*blocks)


def resnet18(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Sequential:
    """d2l's `resnet18(num_classes, in_channels)`; global pooling makes `image_size` irrelevant."""
    del image_size
    net = nn.Sequential(
        nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
    )
    net.add_module("resnet_block1", _stage(64, 64, first=True))
    net.add_module("resnet_block2", _stage(64, 128, first=False))
    net.add_module("resnet_block3", _stage(128, 256, first=False))
    net.add_module("resnet_block4", _stage(256, 512, first=False))
    net.add_module("global_avg_pool", nn.AdaptiveAvgPool2d((1, 1)))
    net.add_module("fc", nn.Sequential(nn.Flatten(), nn.Linear(512, num_classes)))
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(module.weight, std=0.01)
    return net
