"""Relational KD (Park et al. 2019): distance and angle losses are scale-, rotation- and width-free."""

import math

import pytest
import torch

from kegnet.distill.relational import pairwise_distances, rkd_angle_loss, rkd_distance_loss


def _isometry(d_in: int, d_out: int, seed: int = 0) -> torch.Tensor:
    """A (d_in, d_out) matrix with orthonormal rows: distances and angles survive ``x @ w``."""
    q, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=torch.Generator().manual_seed(seed)))
    return q[:d_in]


def test_pairwise_distances_match_cdist_with_a_zero_diagonal() -> None:
    e = torch.randn(7, 2, 3)
    d = pairwise_distances(e)
    assert torch.allclose(d, torch.cdist(e.flatten(1), e.flatten(1)), atol=1e-5)
    assert torch.equal(d.diagonal(), torch.zeros(7))


def test_losses_vanish_for_scaled_rotated_shifted_features_of_another_width() -> None:
    torch.manual_seed(0)
    t = torch.randn(32, 10)
    s = 3.7 * t @ _isometry(10, 24) + 5.0  # the student is 24-wide, the teacher 10-wide
    assert rkd_distance_loss(s, t) < 1e-6
    assert rkd_angle_loss(s, t) < 1e-6


def test_losses_are_positive_for_unrelated_features_and_only_the_student_gets_gradients() -> None:
    torch.manual_seed(0)
    t = torch.randn(32, 10, requires_grad=True)
    s = torch.randn(32, 6, requires_grad=True)
    d, a = rkd_distance_loss(s, t), rkd_angle_loss(s, t)
    assert d > 1e-2 and a > 1e-2
    (d + a).backward()
    assert t.grad is None and s.grad is not None and torch.isfinite(s.grad).all()


def test_angle_loss_is_scale_invariant_and_distance_is_normalized_by_its_mean() -> None:
    torch.manual_seed(1)
    t, s = torch.randn(20, 5), torch.randn(20, 5)
    assert torch.allclose(rkd_angle_loss(0.01 * s, t), rkd_angle_loss(s, t), atol=1e-6)
    assert torch.allclose(rkd_angle_loss(s, 50 * t), rkd_angle_loss(s, t), atol=1e-6)
    assert torch.allclose(rkd_distance_loss(100 * s, t), rkd_distance_loss(s, t), atol=1e-6)
    # Not invariant to everything: a non-uniform stretch of the student changes both relations.
    stretched = s * torch.tensor([10.0, 1, 1, 1, 1])
    assert rkd_distance_loss(stretched, s) > 1e-3 and rkd_angle_loss(stretched, s) > 1e-3


def test_angles_are_the_cosines_at_the_middle_sample() -> None:
    from kegnet.distill.relational import _angles

    e = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    cos = _angles(e)  # [j, i, k]: the angle at e_j between e_i - e_j and e_k - e_j
    assert cos[0, 1, 2].abs() < 1e-6  # right angle at the origin
    assert torch.isclose(cos[1, 0, 2], torch.tensor(1 / math.sqrt(2)))
    assert cos[1, 1, 2] == 0  # degenerate triplet


def test_angle_loss_uses_only_the_first_samples_of_a_big_batch() -> None:
    torch.manual_seed(0)
    t, s = torch.randn(12, 4), torch.randn(12, 4)
    s2 = s.clone()
    s2[10:] = 100.0
    assert torch.equal(rkd_angle_loss(s, t, max_samples=10), rkd_angle_loss(s2, t, max_samples=10))
    assert not torch.equal(rkd_angle_loss(s, t), rkd_angle_loss(s2, t))


def test_batches_must_match() -> None:
    with pytest.raises(ValueError, match="same batch"):
        rkd_distance_loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="at least 3"):
        rkd_angle_loss(torch.randn(2, 3), torch.randn(2, 3))
