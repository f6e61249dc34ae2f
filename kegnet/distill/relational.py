"""Relational knowledge distillation (Park et al., CVPR 2019): match the structure between samples.

Instead of matching each sample's output, the student keeps the teacher's *relations* within a batch:

- distance-wise: pairwise Euclidean distances, each side divided by its own mean off-diagonal distance,
  so the loss ignores the overall scale of either embedding;
- angle-wise: for triplets (i, j, k), the cosine of the angle at j between t_i - t_j and t_k - t_j.

Both use the Huber loss (``smooth_l1``, delta 1). Relations do not depend on the embedding's width, so
teacher and student features may have different dimensions (a factorized student's penultimate layer
usually keeps the teacher's width, but its logits or a low-rank head need not). Distances and angles are
invariant to rotations and translations of an embedding, and to scaling; the losses are zero then.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The angle loss holds (n, n, D) differences and (n, n, n) cosines: it uses at most this many samples of a
# batch (the first ones; batches are drawn at random), which bounds memory at any batch size.
ANGLE_MAX_SAMPLES = 128


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between the rows of ``e``: ``(N, ...) -> (N, N)``, zero diagonal.

    From the Gram matrix (no N x N x D tensor); clamped before the square root so identical rows give a
    zero distance with a zero (not NaN) gradient.
    """
    e = e.flatten(1)
    sq = e.square().sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * e @ e.T).clamp_min(eps)
    d = d2.sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def _normalized_distances(e: torch.Tensor) -> torch.Tensor:
    """Off-diagonal pairwise distances divided by their mean: ``(N, ...) -> (N * (N - 1),)``."""
    d = pairwise_distances(e)
    off = d[~torch.eye(len(e), dtype=torch.bool, device=e.device)]
    return off / off.mean().clamp_min(1e-12)


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Huber loss between mean-normalized pairwise distances of ``student`` and ``teacher``.

    Shapes: ``(N, ...)``, ``(N, ...)`` with the same N (N >= 2; the other dimensions may differ) -> scalar.
    The teacher side is detached.
    """
    _check_batch(student, teacher, 2)
    with torch.no_grad():
        t = _normalized_distances(teacher)
    return F.smooth_l1_loss(_normalized_distances(student), t)


def _angles(e: torch.Tensor) -> torch.Tensor:
    """Cosines of the angles at j of triplets (i, j, k): ``(n, ...) -> (n, n, n)``, indexed [j, i, k]."""
    e = e.flatten(1)
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # [j, i] = unit(e_i - e_j)
    return diff @ diff.transpose(1, 2)


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor,
                   max_samples: int = ANGLE_MAX_SAMPLES) -> torch.Tensor:
    """Huber loss between the triplet angle cosines of ``student`` and ``teacher``.

    Shapes: ``(N, ...)``, ``(N, ...)`` with the same N (N >= 3; the other dimensions may differ) -> scalar.
    Only the first ``max_samples`` samples are used (memory is cubic in their number). Degenerate triplets
    (i = j or k = j) have cosine 0 on both sides. The teacher side is detached.
    """
    _check_batch(student, teacher, 3)
    n = min(len(student), max_samples)
    with torch.no_grad():
        t = _angles(teacher[:n])
    return F.smooth_l1_loss(_angles(student[:n]), t)


def _check_batch(student: torch.Tensor, teacher: torch.Tensor, minimum: int) -> None:
    if len(student) != len(teacher) or len(student) < minimum:
        raise ValueError(f"relational losses need the same batch of at least {minimum} samples on both sides, "
                         f"got {len(student)} and {len(teacher)}")


__all__ = ["ANGLE_MAX_SAMPLES", "pairwise_distances", "rkd_angle_loss", "rkd_distance_loss"]
