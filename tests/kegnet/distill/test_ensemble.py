"""Teacher ensembles: mixing soft outputs, entropy and MC-dropout weights, fallbacks and bounds."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kegnet.distill.ensemble import (
    TeacherEnsemble,
    feature_source,
    has_dropout,
    mc_dropout_uncertainty,
    normalized_entropy,
)
from kegnet.models import create_model


class Fixed(nn.Module):
    """Returns the same logits rows for any input of as many samples (a teacher with known confidence)."""

    def __init__(self, logits: list[list[float]]) -> None:
        super().__init__()
        self.logits = torch.tensor(logits)
        self.head = nn.Linear(1, 1)  # something to tap and to move between devices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(x)] + 0 * x.flatten(1)[:, :1]


def mlp(seed: int, dropout: float = 0.15) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("mlp", input_shape=(6,), num_classes=4, hidden=[32, 32], dropout=dropout).eval()


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_mean_weighting_is_the_plain_average_of_soft_outputs(temperature: float) -> None:
    teachers = [mlp(0), mlp(1), mlp(2)]
    x = torch.randn(9, 6)
    ens = TeacherEnsemble(teachers, weighting="mean", temperature=temperature).eval()
    with torch.no_grad():
        expected = torch.stack([F.softmax(t(x) / temperature, 1) for t in teachers]).mean(0)
        assert torch.allclose(F.softmax(ens(x) / temperature, 1), expected, atol=1e-6)
    assert torch.allclose(ens.last_weights, torch.full((3, 9), 1 / 3))


def test_one_teacher_ensemble_is_that_teacher_whatever_the_weighting() -> None:
    t = mlp(0)
    x = torch.randn(9, 6)
    for weighting in ("mean", "entropy", "mc_dropout"):
        ens = TeacherEnsemble([t], weighting=weighting, temperature=4.0).eval()
        with torch.no_grad():
            assert torch.allclose(F.softmax(ens(x) / 4, 1), F.softmax(t(x) / 4, 1), atol=1e-6)
            assert torch.allclose(F.softmax(ens(x), 1), F.softmax(t(x), 1), atol=1e-5)


def test_entropy_weighting_follows_the_confident_teacher_per_sample() -> None:
    # Sample 0: teacher a is sure of class 0 and b hesitates; sample 1: the other way round (class 2).
    a = Fixed([[8.0, 0.0, 0.0], [0.2, 0.0, 0.1]])
    b = Fixed([[0.1, 0.3, 0.0], [0.0, 0.0, 8.0]])
    ens = TeacherEnsemble([a, b], weighting="entropy", tau=0.1)
    mean = TeacherEnsemble([a, b], weighting="mean")
    x = torch.zeros(2, 1)
    p, p_mean = F.softmax(ens(x), 1), F.softmax(mean(x), 1)
    w = ens.last_weights
    assert w[0, 0] > 0.99 and w[1, 1] > 0.99 and torch.allclose(w.sum(0), torch.ones(2))
    assert p[0, 0] > 0.99 > p_mean[0, 0] and p[1, 2] > 0.99 > p_mean[1, 2]
    # a larger tau flattens the weights toward the mean
    soft = TeacherEnsemble([a, b], weighting="entropy", tau=100.0)
    soft(x)
    assert torch.allclose(soft.last_weights, torch.full((2, 2), 0.5), atol=0.01)


def test_normalized_entropy_spans_zero_to_one() -> None:
    h = normalized_entropy(torch.tensor([[0.0, 0.0, 0.0, 0.0], [50.0, 0.0, 0.0, 0.0]]))
    assert torch.allclose(h, torch.tensor([1.0, 0.0]), atol=1e-5)


def test_mc_dropout_weights_favour_the_teacher_whose_dropout_varies_less() -> None:
    steady, shaky = mlp(0, dropout=0.02), mlp(1, dropout=0.6)
    x = torch.randn(64, 6)
    torch.manual_seed(0)
    u_steady, u_shaky = (mc_dropout_uncertainty(t, x, 16) for t in (steady, shaky))
    assert ((u_shaky >= 0) & (u_shaky <= 1)).all() and u_shaky.mean() > 3 * u_steady.mean()
    ens = TeacherEnsemble([shaky, steady], weighting="mc_dropout", tau=0.1, mc_passes=8).eval()
    with torch.no_grad():
        ens(x)
    assert ens.weighting == "mc_dropout" and (ens.last_weights[1] > 0.5).float().mean() > 0.9
    # the passes switched dropout on only inside: the teachers are deterministic again afterwards
    assert not any(m.training for m in [*steady.modules(), *shaky.modules()])
    with torch.no_grad():
        assert torch.equal(steady(x), steady(x))


def test_mc_dropout_falls_back_to_entropy_without_dropout(caplog: pytest.LogCaptureFixture) -> None:
    plain = nn.Sequential(nn.Linear(6, 4))
    assert has_dropout(mlp(0)) and not has_dropout(plain) and not has_dropout(mlp(0, dropout=0.0))
    with caplog.at_level(logging.WARNING, logger="kegnet.distill.ensemble"):
        ens = TeacherEnsemble([mlp(0), plain], weighting="mc_dropout")
    assert ens.weighting == "entropy" and "teacher(s) 1 have none" in caplog.text


def test_ensemble_is_differentiable_in_its_input_and_bounded_in_size() -> None:
    ens = TeacherEnsemble([mlp(0), mlp(1)], weighting="entropy").eval()
    x = torch.randn(5, 6, requires_grad=True)
    F.cross_entropy(ens(x), torch.zeros(5, dtype=torch.long)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # what generator training needs
    with pytest.raises(ValueError, match="1 to 8"):
        TeacherEnsemble([mlp(0)] * 9)
    with pytest.raises(ValueError, match="base"):
        TeacherEnsemble([mlp(0)], base=1)


def test_features_come_from_the_base_member() -> None:
    a, b = mlp(0), mlp(1)
    assert feature_source(TeacherEnsemble([a, b], base=1)) is b and feature_source(a) is a
