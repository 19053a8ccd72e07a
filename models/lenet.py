"""LeNet as in the from-scratch chapter of Dive into Deep Learning's multi-GPU training."""

import torch
from torch import nn


class LeNet(nn.Module):
    """conv 20@3x3 -> avg-pool -> conv 50@5x5 -> avg-pool -> 800 -> 128 -> classes, ReLU.

    On 28x28 inputs the flattened features are 50*4*4 = 800, as in the book; other sizes get
    the matching width. Weights start as N(0, 0.01^2) and biases at zero, like the book's params.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        side = ((image_size - 2) // 2 - 4) // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, kernel_size=3), nn.ReLU(), nn.AvgPool2d(2, 2),
            nn.Conv2d(20, 50, kernel_size=5), nn.ReLU(), nn.AvgPool2d(2, 2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(50 * side * side, 128), nn.ReLU(), nn.Linear(128, num_classes),
        )
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
