"""Data-distortion guided self-distillation (Xu & Liu, AAAI 2019), on synthetic samples.

Each synthetic sample is distorted twice at random; the student sees both views and is trained to agree
with itself across them: KL between its two softmax outputs in both directions, plus the squared maximum
mean discrepancy (linear kernel) between the two views' mean penultimate features. This is added to the
teacher term, which stays on the undistorted sample (so switching it on changes nothing else).

Distortions (``strength`` s in [0, 1]; inputs are standardized per sample, so they are in units of one
standard deviation):

- images ``(N, C, H, W)``: a random translation per sample of up to ``round(4 s)`` pixels (at most a quarter
  of the side), by replicate-padding and cropping, plus Gaussian noise of std ``0.2 s``. No flips: digits
  and most classes of small images are not mirror-invariant.
- vectors ``(N, F)``: Gaussian noise of std ``0.2 s``, then each feature set to 0 (the mean of a z-scored
  feature, i.e. "unknown") with probability ``0.2 s``, without the 1/(1-p) rescaling of dropout, which
  would move the kept features off their distribution.

All randomness comes from the caller's ``torch.Generator``, so a seed gives the same views every time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def max_shift(height: int, width: int, strength: float) -> int:
    """Largest translation in pixels at ``strength``: ``round(4 s)``, at most a quarter of the shorter side."""
    return min(round(4 * strength), min(height, width) // 4)


def translate(x: torch.Tensor, shift: int, rng: torch.Generator) -> torch.Tensor:
    """Shift each image by its own random offset in ``[-shift, shift]``² (replicate padding).

    Shapes: ``(N, C, H, W) -> (N, C, H, W)``.
    """
    if shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate").permute(0, 2, 3, 1)  # (N, H', W', C)
    dy = torch.randint(0, 2 * shift + 1, (n, 1), generator=rng, device=x.device)
    dx = torch.randint(0, 2 * shift + 1, (n, 1), generator=rng, device=x.device)
    rows = torch.arange(h, device=x.device)[None, :] + dy  # (N, H)
    cols = torch.arange(w, device=x.device)[None, :] + dx  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def distort(x: torch.Tensor, strength: float, rng: torch.Generator) -> torch.Tensor:
    """One random distorted view of a batch (see the module docstring); ``strength`` 0 returns ``x``.

    Shapes: ``(N, C, H, W)`` images or ``(N, F)`` vectors -> the same shape.
    """
    if strength <= 0:
        return x
    noise_std = 0.2 * strength
    if x.dim() == 4:
        x = translate(x, max_shift(x.shape[2], x.shape[3], strength), rng)
        return x + noise_std * torch.randn(x.shape, generator=rng, device=x.device, dtype=x.dtype)
    x = x + noise_std * torch.randn(x.shape, generator=rng, device=x.device, dtype=x.dtype)
    keep = torch.rand(x.shape, generator=rng, device=x.device) >= 0.2 * strength
    return x * keep


def symmetric_kl(a_logits: torch.Tensor, b_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_a || p_b) + KL(p_b || p_a)`` of the softmax outputs, batch mean; gradients reach both sides.

    Shapes: ``(N, K), (N, K) -> scalar``; zero for identical inputs and symmetric in its arguments.
    """
    log_a = F.log_softmax(a_logits, dim=1)
    log_b = F.log_softmax(b_logits, dim=1)
    return (F.kl_div(log_b, log_a, log_target=True, reduction="batchmean")
            + F.kl_div(log_a, log_b, log_target=True, reduction="batchmean"))


def linear_mmd2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared MMD with a linear kernel: the squared distance between the mean feature vectors.

    Shapes: ``(N, ...), (M, ...) -> scalar`` (trailing dimensions equal; flattened).
    """
    return (a.flatten(1).mean(0) - b.flatten(1).mean(0)).square().sum()


__all__ = ["distort", "linear_mmd2", "max_shift", "symmetric_kl", "translate"]
