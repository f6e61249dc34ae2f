"""Empirical bias correction of an int8 QDQ model: the layers' mean outputs move back to the fp32 model's, and
nothing but the quantized biases changes."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kegnet.compression import quantize
from kegnet.compression.bias_correction import correct_bias

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _net() -> nn.Module:
    """A small convnet whose BatchNorm statistics do not match its inputs (as a synthetic batch's do not), and
    whose depthwise kernels hold one large weight among small ones of one sign: per-channel int8 rounds the small
    ones to 0, which shifts the layer's mean output (its inputs follow a ReLU), a systematic error to correct."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 10 * 10, 10)).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2.0)
        net[3].weight.fill_(0.003)  # under half of a step (1/127 of the largest weight): rounded to 0
        net[3].weight[:, :, 1, 1] = 1.0
    return net


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, torch.Tensor, dict]:
    """The prepared fp32 model, its int8 model (MinMax, 64 Gaussian samples), the corrected one, the samples
    and correct_bias's report."""
    work = tmp_path_factory.mktemp("bias")
    net = _net()
    torch.onnx.export(net, (torch.randn(1, 1, 14, 14),), str(work / "fp32.onnx"), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    quantize.prepare(work / "fp32.onnx", work / "prepared.onnx")
    samples = torch.randn(64, 1, 14, 14, generator=torch.Generator().manual_seed(1))
    quantize.quantize(work / "prepared.onnx", work / "int8.onnx", samples, "minmax")
    done = correct_bias(work / "prepared.onnx", work / "int8.onnx", work / "corrected.onnx", samples)
    return work / "prepared.onnx", work / "int8.onnx", work / "corrected.onnx", samples, done


def test_the_mean_logits_move_back_to_the_fp32_models(models) -> None:
    prepared, int8, corrected, samples, done = models
    assert done["layers"] == 3 and done["skipped"] == 0 and done["mean_abs_shift"] > 0
    held_out = torch.randn(512, 1, 14, 14, generator=torch.Generator().manual_seed(2))
    for x in (samples, held_out):
        fp = quantize.OnnxModel(prepared)(x)
        before = (quantize.OnnxModel(int8)(x) - fp).mean(0).abs().mean()
        after = (quantize.OnnxModel(corrected)(x) - fp).mean(0).abs().mean()
        assert after < 0.8 * before


def test_only_the_quantized_biases_change(models) -> None:
    _, int8, corrected, _, _ = models
    old = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(int8)).graph.initializer}
    new = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(corrected)).graph.initializer}
    assert old.keys() == new.keys()
    changed = {name for name in old if not np.array_equal(old[name], new[name])}
    assert changed and all(new[name].dtype == np.int32 for name in changed)
    ops = [[n.op_type for n in onnx.load(str(path)).graph.node] for path in (int8, corrected)]
    assert ops[0] == ops[1]
