"""DAFL's generator losses and generators (bench/peers/dafl.py)."""

import pytest
import torch

from bench.peers.dafl import LATENT, dafl_losses, make_generator


def test_entropy_term_is_lowest_when_every_class_appears() -> None:
    balanced = torch.eye(4).repeat(8, 1) * 10  # confident, all four classes equally often
    collapsed = torch.zeros(32, 4)
    collapsed[:, 0] = 10  # confident, always class 0
    features = torch.ones(32, 5)
    assert dafl_losses(balanced, features)["entropy"] < dafl_losses(collapsed, features)["entropy"] - 0.5
    # Both are confident: the one-hot loss cannot tell them apart, and it is near 0.
    assert dafl_losses(balanced, features)["one_hot"] == pytest.approx(dafl_losses(collapsed, features)["one_hot"])
    assert dafl_losses(balanced, features)["one_hot"] < 1e-3


def test_activation_term_rewards_larger_features() -> None:
    logits = torch.randn(8, 3)
    assert dafl_losses(logits, 2 * torch.ones(8, 6))["activation"] < dafl_losses(logits, torch.ones(8, 6))["activation"]


@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 30, 30), (6,)])
def test_generators_make_the_teachers_input_shape(shape: tuple[int, ...]) -> None:
    g = make_generator(shape)
    assert g(torch.randn(4, LATENT)).shape == (4, *shape)


def test_other_input_ranks_are_refused() -> None:
    with pytest.raises(ValueError, match="images or flat vectors"):
        make_generator((4, 4))
