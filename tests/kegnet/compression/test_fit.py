"""compression.fit = outputs: factorized layers refit to the teacher's layer outputs, layer by layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kegnet.compression import apply_plan, plan_compression
from kegnet.compression.fit import fit_to_outputs
from kegnet.config import CompressionConfig


def _inputs(n: int, seed: int) -> torch.Tensor:
    """Images whose channels live in a 2-dimensional subspace: a weight fit wastes ranks on the others."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(2, 8, generator=torch.Generator().manual_seed(99))
    return torch.einsum("nchw,cd->ndhw", torch.randn(n, 2, 6, 6, generator=g), mix)


def _teacher() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 36, 32), nn.ReLU(), nn.Linear(32, 5)).eval()


@pytest.mark.parametrize("ranks", [{"0": (2, 2), "2": (3, 3), "5": (3, 3)}])
def test_output_fit_beats_the_weight_fit_on_the_inputs_it_sees(ranks: dict[str, tuple[int, int]]) -> None:
    teacher = _teacher()
    plan = plan_compression(teacher, CompressionConfig(layers=list(ranks), rank_method="explicit", ranks=ranks))
    kinds = {p.name: p.kind for p in plan.layers}
    assert kinds == {"0": "pointwise", "2": "conv", "5": "linear"}
    weight_fit = apply_plan(teacher, plan)
    refit = apply_plan(teacher, plan)
    errors = fit_to_outputs(teacher, refit, plan, _inputs(512, 0), batch_size=100)
    assert set(errors) == set(ranks)
    for name, e in errors.items():
        assert e["after"] < e["before"], name
    held_out = _inputs(256, 1)
    with torch.no_grad():
        want = teacher(held_out)
        err = {name: float(((m(held_out) - want) ** 2).mean() / (want**2).mean())
               for name, m in (("weights", weight_fit), ("outputs", refit))}
    assert err["outputs"] < 0.9 * err["weights"]
    assert refit(held_out).shape == want.shape


def test_grouped_layers_keep_their_weight_fit() -> None:
    teacher = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, groups=2)).eval()
    plan = plan_compression(teacher, CompressionConfig(layers=["2"], rank_method="explicit", ranks={"2": (2, 2)}))
    student = apply_plan(teacher, plan)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    errors = fit_to_outputs(teacher, student, plan, _inputs(32, 0))
    assert "grouped" in errors["2"]["skipped"]
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_a_strong_anchor_gives_back_the_weight_fit() -> None:
    """anchor → ∞ weighs the teacher's own map over the samples: the truncated SVD of the weight fit."""
    teacher = _teacher()
    plan = plan_compression(teacher, CompressionConfig(layers=["0"], rank_method="explicit", ranks={"0": (3, 3)}))
    weight_fit, refit = apply_plan(teacher, plan), apply_plan(teacher, plan)
    fit_to_outputs(teacher, refit, plan, _inputs(64, 0), anchor=1e9)
    maps = [(m[0].last.weight[:, :, 0, 0] @ m[0].first.weight[:, :, 0, 0]) for m in (weight_fit, refit)]
    assert torch.allclose(maps[0], maps[1], atol=1e-4)


def test_a_rank_above_what_the_layer_reads_is_fit_with_zero_components() -> None:
    """A Tucker-2 plan of [in 1, out 12] on a 3×3 conv reads 1·9 = 9 features but keeps 12 output components
    (the global allocation gives ResNet-18 [10, 512]): the fit fills the 9 and zeroes the rest."""
    teacher = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1)).eval()
    plan = plan_compression(teacher, CompressionConfig(layers=["2"], rank_method="explicit", ranks={"2": (1, 12)}))
    student = apply_plan(teacher, plan)
    errors = fit_to_outputs(teacher, student, plan, _inputs(64, 0))
    assert errors["2"]["after"] <= errors["2"]["before"]
    core = student[2].core.weight  # (12, 1, 3, 3): output components past the 9 are zero
    assert core.shape == (12, 1, 3, 3) and int((core.flatten(1).abs().sum(1) > 0).sum()) == 9
