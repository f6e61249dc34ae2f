"""Rank allocation by the weights' spectra at the target ratio: every layer keeping the same share of its
energy (balanced), or the least energy lost over all layers (global)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kegnet.compression import apply_plan, plan_compression
from kegnet.compression.allocation import energy_tails, global_ranks, rank_for
from kegnet.compression.plan import check_layers
from kegnet.config import CompressionConfig
from kegnet.errors import CompressionError
from kegnet.metrics import count_parameters


def _low_rank_plus_noise(out: int, inp: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, rank, generator=g) @ torch.randn(rank, inp, generator=g) + 0.01 * torch.randn(
        out, inp, generator=g)


def _model() -> nn.Sequential:
    """A small layer with a flat spectrum (every channel matters) and a large one that is nearly rank 8."""
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 256),
                          nn.ReLU(), nn.Linear(256, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))[0])
        model[4].weight.copy_(_low_rank_plus_noise(256, 256, 8, 1))
    return model


def test_energy_tails_run_from_all_to_nothing() -> None:
    t_in, t_out = energy_tails(nn.Conv2d(6, 10, 3))
    for tail, full in ((t_in, 6), (t_out, 10)):
        assert tail[0] == 1.0 and abs(tail[full]) < 1e-12
        assert np.all(np.diff(tail) <= 1e-12)
    assert rank_for(t_in, 1.0) == 1 and rank_for(t_in, 0.0) == 6


def test_balanced_meets_the_ratio_and_spares_the_layer_that_needs_its_ranks() -> None:
    model = _model()
    layers = ["0", "2", "4"]
    plans = {a: plan_compression(model, CompressionConfig(layers=layers, rank_method="ratio", target_ratio=3.0,
                                                          allocation=a)) for a in ("balanced", "uniform")}
    ratio = count_parameters(model) / count_parameters(apply_plan(model, plans["balanced"]))
    assert 3.0 <= ratio < 3.3
    # Balanced takes the whole reduction from the nearly rank-8 layer and leaves the two whose every
    # direction matters whole; uniform cuts all three by one fraction (rank 2 of 16 in the first).
    assert [p.name for p in plans["balanced"].layers] == ["4"]
    assert {p.name: p.in_rank for p in plans["uniform"].layers}["0"] <= 2
    assert plans["balanced"].layers[0].kept_energy > 0.999
    assert min(p.kept_energy for p in plans["uniform"].layers) < 0.2


def test_balanced_needs_weights_so_the_meta_check_skips_ranks() -> None:
    with torch.device("meta"):
        model = _model()
    check_layers(model, CompressionConfig(layers=["0", "2", "4"], target_ratio=3.0))  # no error, no numpy


def _tucker_model() -> nn.Sequential:
    """A small conv whose every channel matters and a large conv that is nearly rank 4 along both channel modes."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 64, 3),
                          nn.ReLU(), nn.Conv2d(64, 64, 3))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        core = torch.randn(4, 4, 3, 3, generator=g)
        u, v = torch.randn(64, 4, generator=g), torch.randn(64, 4, generator=g)
        model[6].weight.copy_(torch.einsum("oi,ijhw,cj->ochw", u, core, v) + 0.01 * torch.randn(64, 64, 3, 3,
                                                                                               generator=g))
    return model


@pytest.mark.parametrize("build, layers", [(_model, ["0", "2", "4"]), (_tucker_model, ["2", "4", "6"])])
def test_global_takes_the_reduction_where_it_loses_least_and_leaves_the_rest_whole(build, layers) -> None:
    model = build()
    plan = plan_compression(model, CompressionConfig(layers=layers, rank_method="ratio", target_ratio=3.0,
                                                     allocation="global"))
    ratio = count_parameters(model) / count_parameters(apply_plan(model, plan))
    assert 3.0 <= ratio < 3.3
    assert [p.name for p in plan.layers] == [layers[-1]] and plan.layers[0].kept_energy > 0.99
    assert all("left whole by the global allocation" in plan.skipped[n] for n in layers[:-1])


def test_global_ranks_minimize_the_summed_loss_within_the_budget() -> None:
    # Two layers, each either whole (loss 0) or at one of two sizes; budget 100 fits only the cheaper mixes.
    options = {"a": (np.array([0.0, 0.1, 0.5]), np.array([100, 60, 20]), np.array([9, 6, 2]), np.array([9, 6, 2])),
               "b": (np.array([0.0, 0.3, 0.4]), np.array([80, 40, 30]), np.array([8, 4, 3]), np.array([8, 4, 3]))}
    assert global_ranks(options, 100) == {"a": (6, 6), "b": (4, 4)}  # loss 0.4, 100 params
    assert global_ranks(options, 49) is None  # even the smallest choices take 50


def test_global_says_when_the_ratio_is_out_of_reach() -> None:
    with pytest.raises(CompressionError, match="out of reach"):
        plan_compression(_model(), CompressionConfig(layers=["0"], rank_method="ratio", target_ratio=3.0,
                                                     allocation="global"))


def test_the_rank_floor_is_a_multiple_of_the_class_count_and_gives_way_to_the_ratio() -> None:
    model = _model()  # 4 classes

    def ranks(floor: float) -> tuple[list[int], float]:
        plan = plan_compression(model, CompressionConfig(layers=["0", "2", "4"], rank_method="ratio",
                                                         target_ratio=8.0, allocation="global", rank_floor=floor))
        return [p.in_rank for p in plan.layers], count_parameters(model) / count_parameters(apply_plan(model, plan))

    (low, r_low), (twice, r_twice), (reach, r_reach) = ranks(1.0), ranks(2.0), ranks(16.0)
    assert min(low) < 8 <= min(twice)  # 8 = twice the class count
    # 64 is out of reach at 8x: the highest floor that is not (the 256-wide layer; the two 16-wide ones are too
    # narrow for any floor above 15 and fall back to the class count, 4)
    assert 8 < reach[2] < 64 and min(reach[:2]) >= 4
    assert min(r_low, r_twice, r_reach) >= 8.0


def test_a_layer_too_narrow_for_the_floor_falls_back_to_the_class_count_rather_than_staying_whole() -> None:
    # 10 classes, floor 2: rank 20, but no Tucker-2 pair of 20 or more makes the 16-channel conv smaller.
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():  # the narrow conv nearly rank 11 along both channel modes: cheap to cut to 11 or 12
        g = torch.Generator().manual_seed(0)
        core = torch.randn(11, 11, 3, 3, generator=g)
        u, v = (torch.linalg.qr(torch.randn(16, 11, generator=g))[0] for _ in range(2))
        noise = 0.01 * torch.randn(16, 16, 3, 3, generator=g)
        model[0].weight.copy_(torch.einsum("oi,ijhw,kj->okhw", u, core, v) + noise)

    def ranks(floor: float) -> dict[str, tuple[int, int]]:
        plan = plan_compression(model, CompressionConfig(layers=["0", "2"], rank_method="ratio", target_ratio=1.3,
                                                         allocation="global", rank_floor=floor))
        return {p.name: (p.in_rank, p.out_rank) for p in plan.layers}

    plan = ranks(2.0)
    assert min(plan["0"]) >= 10 and max(plan["0"]) < 16  # 10 classes: the narrow conv is cut, not left whole
    assert plan.get("2", (16, 64))[1] >= 20  # the wide conv keeps the floor (its 16 inputs stay whole)
