"""KegNet's networks: a generator G(y, z) for images or feature vectors, and a decoder D(x) ≈ z."""

from __future__ import annotations

import math

import torch
from torch import nn

DECODER_UNITS = 120


def standardize_images(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit variance per sample and channel: ``(N, C, H, W) -> (N, C, H, W)``."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.flatten(2).std(dim=2).clamp_min(eps)[..., None, None]
    return (x - mean) / std


class ImageGenerator(nn.Module):
    """``(N, K) one-hot labels, (N, Z) noise -> (N, C, H, W)`` standardized images, for any C×H×W.

    The paper's generator starts from 1×1 and only reaches 32×32. Here a linear layer projects to a
    ``base × base`` map (≤ 4 on a side), transposed convs double it until it covers H×W, and the result is
    cropped to H×W, so 28×28, 32×32, 64×64 or 224×224 all work with the same recipe.
    """

    def __init__(self, num_classes: int, noise_dim: int, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        c, h, w = image_shape
        self.image_shape = image_shape
        self.num_classes, self.noise_dim = num_classes, noise_dim
        n_up = max(0, math.ceil(math.log2(max(h, w) / 4)))
        self.base = (math.ceil(h / 2**n_up), math.ceil(w / 2**n_up))
        # The paper's widths (128, 64, 16, 4): narrow at high resolution keeps the generator cheap.
        widths = [128] + [max(4, 64 // 4**i) for i in range(n_up)]
        self.fc = nn.Sequential(
            nn.Linear(noise_dim + num_classes, 256), nn.BatchNorm1d(256), nn.ReLU(),
            nn.Linear(256, widths[0] * self.base[0] * self.base[1]),
            nn.BatchNorm1d(widths[0] * self.base[0] * self.base[1]), nn.ReLU(),
        )
        ups: list[nn.Module] = []
        for i in range(n_up):
            ups += [nn.ConvTranspose2d(widths[i], widths[i + 1], 4, 2, 1, bias=False),
                    nn.BatchNorm2d(widths[i + 1]), nn.ReLU()]
        self.ups = nn.Sequential(*ups)
        self.out = nn.Sequential(nn.Conv2d(widths[-1], c, 3, padding=1), nn.Tanh())
        self._c0 = widths[0]

    def forward(self, labels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        x = self.fc(torch.cat((noise, labels), dim=1)).view(-1, self._c0, *self.base)
        x = self.out(self.ups(x))
        _, h, w = self.image_shape
        return standardize_images(x[:, :, :h, :w])


class VectorGenerator(nn.Module):
    """``(N, K), (N, Z) -> (N, F)`` feature vectors, standardized per feature over the batch.

    As in the paper: tabular teachers are trained on z-scored features, so the last layer is a BatchNorm
    without affine parameters (batch statistics in training, running statistics when sampling).
    """

    def __init__(self, num_classes: int, noise_dim: int, num_features: int, units: int = 120,
                 layers: int = 2) -> None:
        super().__init__()
        self.num_classes, self.noise_dim = num_classes, noise_dim
        blocks: list[nn.Module] = []
        prev = noise_dim + num_classes
        for _ in range(layers):
            blocks += [nn.Linear(prev, units), nn.ELU(), nn.BatchNorm1d(units)]
            prev = units
        self.body = nn.Sequential(*blocks, nn.Linear(prev, num_features))
        self.adjust = nn.BatchNorm1d(num_features, affine=False)

    def forward(self, labels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.adjust(self.body(torch.cat((noise, labels), dim=1)))


class Decoder(nn.Module):
    """``(N, *input_shape) -> (N, Z)``: recovers the noise from a sample (the paper's L_dec)."""

    def __init__(self, in_features: int, noise_dim: int, layers: int) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        prev = in_features
        for _ in range(layers):
            blocks += [nn.Linear(prev, DECODER_UNITS), nn.ELU(), nn.BatchNorm1d(DECODER_UNITS)]
            prev = DECODER_UNITS
        self.body = nn.Sequential(*blocks, nn.Linear(prev, noise_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1))


def make_generator(input_shape: tuple[int, ...], num_classes: int, noise_dim: int) -> nn.Module:
    if len(input_shape) == 3:
        return ImageGenerator(num_classes, noise_dim, input_shape)  # type: ignore[arg-type]
    return VectorGenerator(num_classes, noise_dim, input_shape[0])
