"""The int8 model computes what its QDQ graph says on any x86 CPU: 7-bit weights by default, because CPUs without
VNNI add two u8*s8 products in 16 bits and saturate at 32,767 (255 * 127 * 2 = 64,770)."""

import platform
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kegnet.compression import quantize
from kegnet.config import CompressionConfig

ort = pytest.importorskip("onnxruntime")


def _has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not known: do not claim saturation
    return "vnni" in flags


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A 1x1 conv whose two input channels both sit at the top of their range and whose weights are all at the
    top of theirs: the worst case for a 16-bit pair sum."""
    conv = nn.Conv2d(2, 4, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    work = tmp_path_factory.mktemp("weight-range")
    torch.onnx.export(nn.Sequential(conv, nn.ReLU()).eval(), (torch.rand(1, 2, 4, 4),), str(work / "fp32.onnx"),
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    quantize.prepare(work / "fp32.onnx", work / "prepared.onnx")
    calibration = torch.rand(64, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    calibration[:, :, 0, 0] = 1.0  # the range's top is reached
    return work / "prepared.onnx", calibration


def _fused_and_unfused(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The int8 model in onnxruntime's int8 kernels, and its QDQ arithmetic without fusion (exact in fp32)."""
    outputs = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"x": x})[0])
    return outputs[0], outputs[1]


def test_the_default_int8_model_computes_its_qdq_graph(prepared, tmp_path: Path) -> None:
    source, calibration = prepared
    assert CompressionConfig().quantize_reduce_range  # the job's default
    quantize.quantize(source, tmp_path / "int8.onnx", calibration, "minmax")  # the library's default too
    x = np.ones((1, 2, 4, 4), np.float32)  # every input at the top of the range
    fused, exact = _fused_and_unfused(tmp_path / "int8.onnx", x)
    assert np.allclose(fused, 2.0, rtol=0.02) and np.allclose(fused, exact, rtol=1e-3)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or _has_vnni(),
                    reason="saturation needs an x86 CPU without VNNI")
def test_the_full_8_bit_range_saturates_on_a_cpu_without_vnni(prepared, tmp_path: Path) -> None:
    source, calibration = prepared
    quantize.quantize(source, tmp_path / "int8.onnx", calibration, "minmax", reduce_range=False)
    fused, exact = _fused_and_unfused(tmp_path / "int8.onnx", np.ones((1, 2, 4, 4), np.float32))
    assert np.allclose(exact, 2.0, rtol=0.02)  # the graph says 1 + 1
    assert np.all(fused < 0.6 * exact)  # the pair sum stopped at 32,767 of 64,770: about half
