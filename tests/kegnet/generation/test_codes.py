"""The class codes the generators are asked for: one-hot, or random points of the class simplex."""

import pytest
import torch
from torch import nn

from kegnet.config import DistillConfig, PipelineConfig
from kegnet.generation import KegNetSampler
from kegnet.generation.train import simplex_codes


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
    assert DistillConfig().label_codes == "simplex"
    assert PipelineConfig.from_preset("paper").distill.label_codes == "one_hot"
    with pytest.raises(ValueError):
        KegNetSampler([], 3, 2, torch.device("cpu"), "dirichlet")  # type: ignore[arg-type]
