"""The whole pipeline on the families people bring: torchvision and timm classifiers, end to end.

Each case loads a saved safetensors teacher, trains tiny generators, factorizes a few named layers (small
ones, so the Tucker decompositions take a moment; the default selection is checked on its own, without
decomposing), fine-tunes, exports, reloads the student and compares. Full-rank plans must give back the
teacher's function on every family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kegnet import ModelSpec, create_model, load_student, run_pipeline
from kegnet.compression import CompressionPlan, apply_plan, plan_compression
from kegnet.compression.layers import LowRankConv1x1, LowRankLinear, Tucker2Conv2d
from kegnet.compression.plan import _full_ranks, _layer_plan
from kegnet.config import CompressionConfig
from kegnet.metrics import count_parameters
from tests.conftest import tiny_config

IMG = (3, 32, 32)


@dataclass(frozen=True)
class Case:
    arch: str
    layers: tuple[str, ...]  # what the pipeline factorizes (small layers: decomposing big ones takes long)
    kwargs: dict = field(default_factory=dict)
    depthwise: tuple[str, ...] = ()  # among ``layers``: must be skipped as depthwise
    grouped: tuple[str, ...] = ()  # among ``layers``: grouped (not depthwise), factorized per group
    linear: tuple[str, ...] = ()  # among ``layers``: nn.Linear, factorized by SVD
    onnx: bool = False  # also write and check student.onnx

    @property
    def id(self) -> str:
        return self.arch.replace(":", "-")

    def spec(self) -> ModelSpec:
        return ModelSpec(arch=self.arch, arch_kwargs=self.kwargs, input_shape=IMG, num_classes=10)


CASES = [
    Case("torchvision:resnet18", ("layer1.0.conv1", "layer1.0.conv2", "fc"), linear=("fc",), onnx=True),
    Case("torchvision:mobilenet_v2", ("features.2.conv.1.0", "features.2.conv.2", "features.3.conv.2"),
         depthwise=("features.2.conv.1.0",)),
    Case("timm:mobilenetv3_small_100", ("blocks.1.0.conv_dw", "blocks.1.0.conv_pwl", "blocks.2.0.se.conv_reduce",
                                         "blocks.1.1.conv_pwl"), depthwise=("blocks.1.0.conv_dw",), onnx=True),
    Case("torchvision:mobilenet_v3_small", ("features.2.block.1.0", "features.2.block.2.0",
                                            "features.4.block.2.fc1", "features.3.block.2.0"),
         depthwise=("features.2.block.1.0",)),
    Case("timm:efficientnet_b0", ("blocks.1.0.conv_dw", "blocks.1.0.conv_pwl", "blocks.1.0.se.conv_reduce",
                                   "blocks.1.1.conv_pwl"), depthwise=("blocks.1.0.conv_dw",)),
    Case("timm:regnetx_002", ("s2.b1.conv2.conv", "s2.b1.conv3.conv"), grouped=("s2.b1.conv2.conv",)),
    Case("torchvision:regnet_x_400mf", ("trunk_output.block2.block2-0.f.b.0", "trunk_output.block2.block2-0.f.c.0"),
         grouped=("trunk_output.block2.block2-0.f.b.0",)),
    Case("timm:convnext_atto", ("stages.0.blocks.0.conv_dw", "stages.1.downsample.1", "head.fc"),
         depthwise=("stages.0.blocks.0.conv_dw",), linear=("head.fc",)),
    Case("timm:vit_tiny_patch16_224", ("blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1",
                                        "blocks.0.mlp.fc2"),
         kwargs={"img_size": 32, "patch_size": 8},
         linear=("blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2")),
    Case("torchvision:densenet121", ("features.denseblock1.denselayer1.conv2", "features.transition1.conv")),
    Case("torchvision:googlenet", ("inception3a.branch2.1.conv", "inception3a.branch3.1.conv", "fc"),
         linear=("fc",)),
]


def _teacher(case: Case) -> nn.Module:
    torch.manual_seed(0)
    spec = case.spec()
    return create_model(spec.arch, input_shape=spec.input_shape, num_classes=spec.num_classes,
                        **spec.kwargs()).eval()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_pipeline_end_to_end(tmp_path: Path, case: Case) -> None:
    spec, teacher = case.spec(), _teacher(case)
    ckpt = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(ckpt))
    config = tiny_config("kegnet", compression={"layers": list(case.layers), "rank_method": "fraction",
                                                "rank_fraction": 0.25, "n_iter_max": 1})
    config = config.model_copy(update={"export_portable": False, "export_onnx": case.onnx})
    out = tmp_path / "out"

    result = run_pipeline(ckpt, spec, config, out, device="cpu", seed=0)

    r = result.report
    c = r.classify
    planned = {p["name"] for p in c.plan["layers"]}
    assert planned, c.plan
    assert r.parameters.student < r.parameters.teacher
    assert count_parameters(result.student) == r.parameters.student < count_parameters(teacher)
    assert r.architecture["source"] == spec.source and r.architecture["name"] == spec.arch.split(":")[1]
    for name in case.depthwise:
        assert "depthwise" in c.plan["skipped"][name] and name not in planned
    for name in case.grouped:
        original = teacher.get_submodule(name)
        assert original.groups > 1 and original.in_channels // original.groups > 1
        assert name in planned
        layer = result.student.get_submodule(name)
        assert isinstance(layer, Tucker2Conv2d)
        assert layer.first.groups == layer.core.groups == layer.last.groups == original.groups
    for name in case.linear:
        assert name in planned and isinstance(result.student.get_submodule(name), LowRankLinear)
    for name in planned:
        pointwise = getattr(teacher.get_submodule(name), "kernel_size", None) == (1, 1)
        expected = LowRankConv1x1 if pointwise else Tucker2Conv2d | LowRankLinear
        assert isinstance(result.student.get_submodule(name), expected), name

    speed = r.speed
    assert speed.unit == "ms"
    for who in (speed.teacher, speed.student):
        assert who["batch1_ms"] > 0 and who["batch64_ms"] > 0
    assert set(c.layer_latency) == planned
    for row in c.layer_latency.values():
        assert all(row[f"{w}_batch{b}_ms"] > 0 for w in ("original", "factorized") for b in (1, 64))

    if case.onnx:
        assert (out / "student.onnx").exists() and c.onnx_skipped is None
        assert c.onnx_check["max_abs_diff"] < 1e-3, c.onnx_check
    else:
        assert "student.onnx" not in r.files

    x = torch.randn(4, *IMG, generator=torch.Generator().manual_seed(1))
    reloaded = load_student(out)
    with torch.no_grad():
        want = result.student.eval()(x)
        assert want.shape == (4, 10)
        torch.testing.assert_close(reloaded(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_default_selection(case: Case) -> None:
    """The default layers on the whole network (ranks by fraction: no decomposition is computed here)."""
    teacher = _teacher(case)
    plan = plan_compression(teacher, CompressionConfig(rank_method="fraction", rank_fraction=0.25))
    planned = {p.name: p for p in plan.layers}
    convs = {n: m for n, m in teacher.named_modules() if type(m) is nn.Conv2d}
    depthwise = [n for n, m in convs.items() if m.groups > 1 and m.in_channels == m.groups]
    grouped = [n for n, m in convs.items() if m.groups > 1 and m.in_channels > m.groups]
    for name in depthwise:
        assert name not in planned
        if name != next(iter(convs)):  # the stem is left out of the default selection altogether
            assert "depthwise" in plan.skipped[name]
    for name in grouped:
        assert name in planned or "would not reduce" in plan.skipped[name]
    if grouped:
        assert any(n in planned for n in grouped)
    if "vit" in case.arch:
        for kind in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            names = [n for n in planned if n.endswith(kind)]
            assert len(names) == 12 and all(planned[n].kind == "linear" for n in names), kind
        assert "head" not in planned  # the classifier is left alone
    assert all(p.params_after < p.params_before for p in plan.layers)


# A full-rank Tucker-2 costs SVDs of the conv's unfoldings: resnet18's 512-channel 3×3 convs take seconds each
# on a small CPU, so k×k convs above this many weights per group are left out (the same code factorizes the
# rest); every 1×1 conv and linear is included (one small SVD each).
FULL_RANK_MAX_TUCKER_WEIGHTS = 600_000


def _full_rank_plan(model: nn.Module) -> CompressionPlan:
    plan = CompressionPlan()
    for name, m in model.named_modules():
        if type(m) is nn.Conv2d:
            if m.in_channels // m.groups == 1:  # depthwise: never factorized
                continue
            if tuple(m.kernel_size) != (1, 1) and m.weight.numel() // m.groups > FULL_RANK_MAX_TUCKER_WEIGHTS:
                continue
        elif type(m) is not nn.Linear:
            continue
        plan.layers.append(_layer_plan(name, m, *_full_ranks(m)))
    return plan


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_full_rank_reproduces_the_teacher(case: Case) -> None:
    teacher = _teacher(case)
    plan = _full_rank_plan(teacher)
    assert len(plan.layers) >= 3
    student = apply_plan(teacher, plan, n_iter_max=1)
    replaced = [n for n, m in student.named_modules() if isinstance(m, Tucker2Conv2d | LowRankConv1x1 | LowRankLinear)]
    assert len(replaced) == len(plan.layers)
    x = torch.randn(4, *IMG, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = teacher(x), student.eval()(x)
    scale = want.abs().max()
    assert scale > 0
    assert (got - want).abs().max() <= 1e-4 * scale + 1e-6, (got - want).abs().max() / scale
