import pytest
import torch
from torch import nn

from kegnet import create_model
from kegnet.compression import CompressionPlan, LowRankLinear, Tucker2Conv2d, apply_plan, evbmf_rank, plan_compression
from kegnet.config import CompressionConfig
from kegnet.errors import CompressionError
from kegnet.metrics import count_parameters
from tests.conftest import LENET_SPEC, MNIST_TEACHER, needs_shared


@pytest.mark.parametrize("kwargs", [
    {"stride": 2, "padding": 1},
    {"dilation": 2, "padding": 2},
    {"padding": "same"},
    {"padding": 1, "padding_mode": "reflect"},
    {"bias": False},
    {"groups": 2, "padding": 1},
])
def test_full_rank_tucker_is_exact(kwargs: dict) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, **kwargs)
    g = conv.groups
    layer = Tucker2Conv2d.from_conv(conv, 8 // g, 12 // g)
    x = torch.randn(3, 8, 11, 11)
    assert torch.allclose(layer(x), conv(x), atol=1e-5)


def test_full_rank_linear_is_exact_and_low_rank_is_best_approximation() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(20, 7)
    x = torch.randn(4, 20)
    assert torch.allclose(LowRankLinear.from_linear(lin, 7)(x), lin(x), atol=1e-5)
    low = LowRankLinear.from_linear(lin, 2)
    w_hat = low.last.weight @ low.first.weight
    s = torch.linalg.svdvals(lin.weight.detach())
    assert torch.allclose(torch.linalg.norm(lin.weight - w_hat), s[2:].norm(), atol=1e-4)


def test_evbmf_finds_planted_rank_and_clamps_noise() -> None:
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(60, 5, generator=gen) @ torch.randn(5, 80, generator=gen)
    noisy = low + 0.01 * torch.randn(60, 80, generator=gen)
    assert evbmf_rank(noisy.numpy()) == 5
    assert evbmf_rank(noisy.T.numpy()) == 5  # either orientation
    assert evbmf_rank(0.01 * torch.randn(30, 40, generator=gen).numpy()) <= 1


def test_default_layers_skip_first_conv_and_depthwise() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 3), nn.Flatten(),
                          nn.Linear(16, 4))
    plan = plan_compression(model, CompressionConfig(rank_method="fraction", rank_fraction=0.5))
    assert [p.name for p in plan.layers] == ["2"]
    assert "depthwise" in plan.skipped["1"]
    mlp = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 3))
    plan = plan_compression(mlp, CompressionConfig(rank_method="fraction", rank_fraction=0.25))
    assert [p.name for p in plan.layers] == ["0", "2"]


def test_the_global_allocation_also_weighs_the_linears_that_hold_less_than_the_convs() -> None:
    torch.manual_seed(0)
    lenet = create_model("lenet5", input_shape=(1, 32, 32), num_classes=10)  # fc1 (10k) beside conv3 (48k)
    considered = lambda plan: {p.name for p in plan.layers} | set(plan.skipped)  # noqa: E731
    assert "fc1" not in considered(plan_compression(lenet, CompressionConfig(rank_method="fraction")))
    assert "fc1" not in considered(plan_compression(lenet, CompressionConfig(allocation="uniform")))
    plan = plan_compression(lenet, CompressionConfig(target_ratio=4.1, keep_slower=True))
    assert "fc1" in considered(plan) and "fc2" not in considered(plan)  # the head never


def test_layers_that_would_not_shrink_are_skipped() -> None:
    mlp = nn.Sequential(nn.Linear(100, 100), nn.ELU(), nn.Linear(100, 10), nn.ELU(), nn.Linear(10, 10))
    # rank 10 shrinks the 100x100 layer, not the 100x10 one (100*10 + 10*10 + 10 > 100*10 + 10)
    plan = plan_compression(mlp, CompressionConfig(layers=["*"], rank_method="explicit", ranks={"*": (10, 10)}))
    assert [p.name for p in plan.layers] == ["0"]
    assert "would not reduce" in plan.skipped["2"] and "would not reduce" in plan.skipped["4"]
    with pytest.raises(CompressionError, match="no layer gets smaller"):
        plan_compression(mlp, CompressionConfig(layers=["4"], rank_method="explicit", ranks={"*": (10, 10)}))


def test_explicit_ranks_target_ratio_and_errors() -> None:
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.Conv2d(32, 64, 3), nn.Conv2d(64, 64, 3))
    plan = plan_compression(model, CompressionConfig(layers=["1", "2"], rank_method="explicit",
                                                     ranks={"1": (4, 6), "*": (5, 5)}))
    assert [(p.in_rank, p.out_rank) for p in plan.layers] == [(4, 6), (5, 5)]
    plan = plan_compression(model, CompressionConfig(layers=["1", "2"], rank_method="ratio", target_ratio=3.0))
    student = apply_plan(model, plan)
    ratio = count_parameters(model) / count_parameters(student)
    assert 3.0 <= ratio < 3.3
    with pytest.raises(CompressionError, match="matches no Conv2d"):
        plan_compression(model, CompressionConfig(layers=["fc9"]))
    with pytest.raises(CompressionError, match="out of reach"):
        plan_compression(model, CompressionConfig(layers=["1"], rank_method="ratio", target_ratio=500))


@pytest.mark.parametrize("allocation", ["uniform", "balanced", "global"])
def test_the_default_ratio_falls_back_to_the_layers_where_the_model_cannot_reach_it(allocation: str) -> None:
    # Layer "1" holds a fifth of the weights: no rank makes the whole model 2x smaller.
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 28 * 28, 10))
    unset = CompressionConfig(layers=["1"], allocation=allocation)
    assert unset.target_ratio is None and unset.ratio == 2.0
    # The unset default survives the trip through JSON that every job's config takes (isolation, Redis).
    unset = CompressionConfig.model_validate_json(unset.model_dump_json())
    plan = plan_compression(model, unset)
    (layer,) = plan.layers
    assert 2.0 <= layer.params_before / layer.params_after < 2.6  # 2x of that layer instead
    with pytest.raises(CompressionError, match="out of reach"):  # asked for: refused, saying so
        plan_compression(model, unset.model_copy(update={"target_ratio": 2.0}))


def test_plan_round_trips_and_rebuilds_structure() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 4))
    plan = plan_compression(model, CompressionConfig(layers=["1", "3"], rank_method="fraction"))
    again = CompressionPlan.from_dict(plan.to_dict())
    built = apply_plan(model, plan)
    empty = apply_plan(model, again, initialize=False)
    empty.load_state_dict(built.state_dict())
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(empty(x), built(x))


@needs_shared(MNIST_TEACHER)
def test_paper_evbmf_ranks_and_ratios_on_the_mnist_teacher() -> None:
    from kegnet import load_teacher

    teacher = load_teacher(MNIST_TEACHER, LENET_SPEC)
    for layers, ranks, ratio in ((["conv3"], {"conv3": (7, 11)}, 3.62),
                                 (["conv2", "conv3"], {"conv2": (3, 4), "conv3": (7, 11)}, 4.10)):
        plan = plan_compression(teacher, CompressionConfig(layers=layers, rank_method="evbmf"))
        assert {p.name: (p.in_rank, p.out_rank) for p in plan.layers} == ranks
        assert round(count_parameters(teacher) / count_parameters(apply_plan(teacher, plan)), 2) == ratio
