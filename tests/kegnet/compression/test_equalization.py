"""Range equalization inside factorized layers: the fp32 function stays, the channel ranges between the linear
maps become one, and the int8 model comes closer to the fp32 one."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kegnet.compression import quantize
from kegnet.compression.equalization import equalize
from kegnet.distill.exam import Exam

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _net() -> nn.Module:
    """Two factorized-like pairs (Conv -> Conv, Linear -> Linear, nothing between), the channels between them
    spanning ranges 100x apart, as a fine-tuned student's can."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False), nn.Conv2d(4, 8, 3),
                        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 10 * 10, 6), nn.Linear(6, 10)).eval()
    with torch.no_grad():
        for first, second in ((net[2], net[3]), (net[6], net[7])):
            gain = torch.logspace(-1, 1, first.weight.shape[0])  # channel i's range times gain_i ...
            first.weight.mul_(gain.view(-1, *[1] * (first.weight.dim() - 1)))
            if first.bias is not None:
                first.bias.mul_(gain)
            second.weight.div_(gain.view(1, -1, *[1] * (second.weight.dim() - 2)))  # ... and undone after
    return net


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.Tensor, dict]:
    work = tmp_path_factory.mktemp("equalize")
    torch.onnx.export(_net(), (torch.randn(1, 1, 14, 14),), str(work / "fp32.onnx"), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    quantize.prepare(work / "fp32.onnx", work / "prepared.onnx")
    samples = torch.randn(128, 1, 14, 14, generator=torch.Generator().manual_seed(1))
    done = equalize(work / "prepared.onnx", work / "equalized.onnx", samples)
    return work / "prepared.onnx", work / "equalized.onnx", samples, done


def test_the_fp32_function_is_unchanged_and_the_ranges_are_one(models) -> None:
    prepared, equalized, _, done = models
    assert done["pairs"] == 2
    assert done["spread_before"] > 20 and done["spread_after"] < 1.1
    x = torch.randn(256, 1, 14, 14, generator=torch.Generator().manual_seed(2))
    a, b = quantize.OnnxModel(prepared)(x), quantize.OnnxModel(equalized)(x)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item())
    ops = [[n.op_type for n in onnx.load(str(p)).graph.node] for p in (prepared, equalized)]
    assert ops[0] == ops[1]


def test_the_int8_model_comes_closer_to_fp32(models, tmp_path: Path) -> None:
    prepared, equalized, samples, _ = models
    held_out = torch.randn(512, 1, 14, 14, generator=torch.Generator().manual_seed(3))
    fp = quantize.OnnxModel(prepared)(held_out)
    errors = {}
    for name, source in (("plain", prepared), ("equalized", equalized)):
        quantize.quantize(source, tmp_path / f"{name}.onnx", samples, "minmax")
        errors[name] = (quantize.OnnxModel(tmp_path / f"{name}.onnx")(held_out) - fp).pow(2).mean().item()
    assert errors["equalized"] < 0.5 * errors["plain"]


def test_a_model_without_pairs_is_written_unchanged(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 12, 10)).eval()
    torch.onnx.export(net, (torch.randn(1, 1, 14, 14),), str(tmp_path / "fp32.onnx"), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    done = equalize(tmp_path / "fp32.onnx", tmp_path / "out.onnx", torch.randn(16, 1, 14, 14))
    assert done == {"pairs": 0, "spread_before": 1.0, "spread_after": 1.0}
    before, after = (onnx.load(str(p)).graph.initializer for p in (tmp_path / "fp32.onnx", tmp_path / "out.onnx"))
    assert all(np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
               for a, b in zip(before, after, strict=True))


def test_the_job_keeps_the_candidate_closest_to_the_teacher(models, tmp_path: Path) -> None:
    prepared, _, samples, _ = models
    x = torch.randn(256, 1, 14, 14, generator=torch.Generator().manual_seed(4))
    exam = Exam(x, quantize.OnnxModel(prepared)(x), {"gaussian": len(x)})
    best = quantize.best_int8(prepared, tmp_path, samples, exam)
    assert set(best.grades) == {*quantize.METHODS, *(f"equalized {m}" for m in quantize.METHODS)}
    assert best.grade.kl == min(g.kl for g in best.grades.values())
    assert best.equalized and best.reference == tmp_path / "equalized.onnx" and best.path.is_file()
    assert best.equalization is not None and best.equalization["pairs"] == 2
    (tmp_path / "plain").mkdir()
    plain = quantize.best_int8(prepared, tmp_path / "plain", samples, exam, candidates="plain")
    assert set(plain.grades) == set(quantize.METHODS) and not plain.equalized and plain.equalization is None
