"""The class codes the generators are asked for: one-hot, or random points of the class simplex."""

import pytest
import torch
from torch import nn

from kegnet.config import ClassifierConfig, DistillConfig
from kegnet.generation import KegNetSampler
from kegnet.generation.codes import simplex_codes


def test_simplex_codes_are_uniform_mixes_repeatable_by_seed() -> None:
    c = simplex_codes(20_000, 10, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert c.shape == (20_000, 10) and (c >= 0).all()
    assert torch.allclose(c.sum(1), torch.ones(20_000))
    assert torch.allclose(c.mean(0), torch.full((10,), 0.1), atol=0.005)
    # Dirichlet(1): the top class of a 10-way uniform mix averages ~0.29, far from one-hot.
    assert 0.25 < c.max(1).values.mean().item() < 0.33
    again = simplex_codes(20_000, 10, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(c, again)


class _Recorder(nn.Module):
    """A stand-in generator that keeps the codes it was given and returns them as the sample."""

    def __init__(self) -> None:
        super().__init__()
        self.codes: list[torch.Tensor] = []

    def forward(self, codes: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        self.codes.append(codes)
        return codes.clone()


@pytest.mark.parametrize("codes", ["one_hot", "simplex"])
def test_sampler_asks_for_the_chosen_codes_and_labels_the_top_class(codes: str) -> None:
    gen = _Recorder()
    x, y = KegNetSampler([gen], 4, 3, torch.device("cpu"), codes).sample(64, torch.Generator().manual_seed(0))
    asked = gen.codes[0]
    assert torch.allclose(asked.sum(1), torch.ones(64))
    one_hot = bool(((asked == 0) | (asked == 1)).all())
    assert one_hot == (codes == "one_hot")
    assert torch.equal(y, x.argmax(1))  # the label is the code's top class


def test_defaults_mix_classes_for_the_student_but_the_paper_preset_does_not() -> None:
    assert DistillConfig().label_codes == "auto"
    names = {(image, classes): [r.name for r in ClassifierConfig().candidate_recipes(image, classes)]
             for image in (True, False) for classes in (2, 10, 11, 26)}
    # Uniform mixes of all classes for images with few classes; mixes of two above ten classes, where a uniform
    # mix is far from every class; vectors: sparse mixes with half the batch Gaussian noise.
    assert names[(True, 10)] == ["kegnet/simplex"] and names[(True, 11)] == ["kegnet/pairs"]
    assert names[(False, 2)] == names[(False, 26)] == ["kegnet/sparse+noise0.5"]
    paper = ClassifierConfig.from_preset("paper")
    assert [r.name for r in paper.candidate_recipes(True, 10)] == ["kegnet/one_hot"]
    with pytest.raises(ValueError):
        KegNetSampler([], 3, 2, torch.device("cpu"), "dirichlet")  # type: ignore[arg-type]


def _draw(scheme: str, n: int, classes: int, seed: int = 0) -> torch.Tensor:
    from kegnet.generation.codes import draw_codes

    return draw_codes(scheme, n, classes, torch.Generator().manual_seed(seed), torch.device("cpu"))


@pytest.mark.parametrize("scheme", ["one_hot", "simplex", "pairs", "sparse"])
@pytest.mark.parametrize("classes", [2, 10, 26])
def test_every_scheme_gives_simplex_points_repeatable_by_seed(scheme: str, classes: int) -> None:
    c = _draw(scheme, 4000, classes)
    assert c.shape == (4000, classes) and (c >= 0).all()
    assert torch.allclose(c.sum(1), torch.ones(4000), atol=1e-5)
    assert torch.equal(c, _draw(scheme, 4000, classes))
    assert not torch.equal(c, _draw(scheme, 4000, classes, seed=1))
    assert torch.allclose(c.mean(0), torch.full((classes,), 1 / classes), atol=0.03)  # no class favoured


def test_pairs_mix_exactly_two_distinct_classes() -> None:
    c = _draw("pairs", 2000, 26)
    assert ((c > 0).sum(1) <= 2).all() and ((c > 0).sum(1) == 2).float().mean() > 0.99


@pytest.mark.parametrize("classes", [3, 10, 26, 100])
def test_sparse_codes_stay_close_to_a_few_classes_whatever_the_class_count(classes: int) -> None:
    # The simplex scheme's effective class count grows with C (26 classes: ~13.5); sparse stays below 3.
    effective = 1 / (_draw("sparse", 20_000, classes) ** 2).sum(1).mean()
    assert 1.5 < effective < 3.0
    if classes >= 10:
        assert 1 / (_draw("simplex", 20_000, classes) ** 2).sum(1).mean() > 5


def test_unknown_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown class-code scheme"):
        _draw("dirichlet", 4, 3)
