"""Fast-DFKD's adversarial term and generators (bench/peers/fast.py)."""

import pytest
import torch

from bench.peers.fast import LATENT, adversarial_loss, make_generator


def test_adversarial_term_counts_only_samples_where_student_and_teacher_agree() -> None:
    teacher = torch.tensor([[4.0, 0.0], [4.0, 0.0]])
    agreeing_far = torch.tensor([[0.5, 0.0], [0.5, 0.0]])  # same class, much less sure: a large KL
    agreeing_near = teacher.clone()
    disagreeing = torch.tensor([[0.0, 4.0], [0.0, 4.0]])
    assert adversarial_loss(agreeing_near, teacher) == pytest.approx(0.0, abs=1e-6)
    assert adversarial_loss(agreeing_far, teacher) < -0.1  # the generator is rewarded for finding these
    assert adversarial_loss(disagreeing, teacher) == 0  # masked out: no reward for pushing past the boundary


@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 30, 30), (6,)])
def test_generators_make_the_teachers_input_shape(shape: tuple[int, ...]) -> None:
    assert make_generator(shape)(torch.randn(4, LATENT)).shape == (4, *shape)
