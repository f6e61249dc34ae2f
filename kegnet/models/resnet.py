"""CIFAR-style ResNet (6n+2 layers) with the parameter-free zero-pad shortcut, as in the KegNet teachers.

Key names follow the paper's checkpoints: conv1, norm1, layers1..3 of blocks (conv1, bn1, conv2, bn2), linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kegnet.models.registry import register_model


class PadShortcut(nn.Module):
    """Zero-pad channels up to ``out_channels`` and subsample by ``stride``; has no parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, [0, 0, 0, 0, 0, self.extra])
        return x[:, :, :: self.stride, :: self.stride]  # same as a 1×1 max-pool with this stride


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = (
            nn.Identity() if in_channels == out_channels and stride == 1
            else PadShortcut(in_channels, out_channels, stride)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Shapes: ``(N, C, H, W) -> (N, num_classes)``; global average pooling makes any H, W ≥ 4 work."""

    def __init__(self, in_channels: int, num_classes: int, n: int = 2, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1)
        self.norm1 = nn.BatchNorm2d(widths[0])
        stages, prev = [], widths[0]
        for i, width in enumerate(widths):
            blocks = [BasicBlock(prev, width, 1 if i == 0 else 2)]
            blocks += [BasicBlock(width, width) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            prev = width
        # Attribute names layers1..layersK match the paper's checkpoints.
        for i, stage in enumerate(stages, start=1):
            self.add_module(f"layers{i}", stage)
        self.num_stages = len(stages)
        self.linear = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm1(self.conv1(x)))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layers{i}")(x)
        # The paper uses AvgPool2d(8) on 8×8 maps; global pooling is identical there and works for other sizes.
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.linear(x)


@register_model("resnet")
def resnet(input_shape: tuple[int, ...], num_classes: int, depth: int = 14,
           widths: list[int] | None = None) -> nn.Module:
    """``depth`` = 6n+2 (14 → two blocks per stage, the paper's ResNet-14)."""
    if len(input_shape) != 3:
        raise ValueError("resnet takes C,H,W images")
    if depth < 8 or (depth - 2) % 6 != 0 or depth > 200:
        raise ValueError(f"depth must be 6n+2 between 8 and 200, got {depth}")
    widths_t = tuple(widths) if widths else (16, 32, 64)
    if not 1 <= len(widths_t) <= 6 or not all(isinstance(w, int) and 1 <= w <= 1024 for w in widths_t):
        raise ValueError("widths must be 1 to 6 integers in 1..1024")
    return ResNet(input_shape[0], num_classes, n=(depth - 2) // 6, widths=widths_t)
