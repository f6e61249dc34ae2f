"""KegNet's generator losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diversity_loss(samples: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``exp(-mean_{i,j} d_x(i,j) * d_z(i,j))`` (Yoo et al. 2019, Eq. 5).

    ``d_x`` is the mean absolute difference of two samples, ``d_z`` the mean squared difference of their
    noise vectors. ``torch.cdist`` computes the B×B distances directly; the paper's code broadcast a
    B×B×D tensor (about 39 GB per intermediate at 224×224 with batch 256).

    Shapes: ``samples (B, ...)``, ``noise (B, Z)`` -> scalar.
    """
    x = samples.flatten(1)
    d_x = torch.cdist(x, x, p=1) / x.shape[1]
    d_z = torch.cdist(noise, noise, p=2).square() / noise.shape[1]
    return torch.exp(-(d_x * d_z).mean())


def decoder_loss(predicted_noise: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """MSE between the decoder's estimate and the true noise."""
    return F.mse_loss(predicted_noise, noise)


def smoothness_loss(samples: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation: mean absolute difference of neighbouring pixels, rows plus columns.

    An image prior (as in DeepInversion, Yin et al. 2020): without it the generators settle on
    high-frequency textures that the teacher classifies with certainty but that look nothing like its
    training data (seen on the MNIST teacher; docs/benchmarks.md measures what the prior does to the student).
    Shapes: ``(N, C, H, W) -> scalar``.
    """
    rows = (samples[:, :, 1:, :] - samples[:, :, :-1, :]).abs().mean()
    cols = (samples[:, :, :, 1:] - samples[:, :, :, :-1]).abs().mean()
    return rows + cols
