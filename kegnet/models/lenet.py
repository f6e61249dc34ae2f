"""LeNet-5 as in the KegNet paper's MNIST teacher (state-dict keys conv1..conv3, fc1, fc2)."""

from __future__ import annotations

import torch
from torch import nn

from kegnet.models.registry import register_model


class LeNet5(nn.Module):
    """conv(5) → ReLU → pool → conv(5) → ReLU → pool → conv(5) → ReLU → fc → ReLU → fc.

    Shapes: ``(N, C, 32, 32) -> (N, num_classes)``; conv3 must reduce the map to 1×1, so only 32×32 inputs fit.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.max_pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.max_pool2 = nn.MaxPool2d(2, 2)
        self.conv3 = nn.Conv2d(16, 120, 5)
        self.fc1 = nn.Linear(120, 84)
        self.fc2 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.max_pool1(torch.relu(self.conv1(x)))
        x = self.max_pool2(torch.relu(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


@register_model("lenet5")
def lenet5(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) != 3 or input_shape[1:] != (32, 32):
        raise ValueError(f"lenet5 takes C,32,32 images, got input shape {','.join(map(str, input_shape))}")
    return LeNet5(input_shape[0], num_classes)
