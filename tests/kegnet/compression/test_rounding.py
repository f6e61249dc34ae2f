"""Adaptive rounding of an int8 QDQ model: each layer's output moves closer to the fp32 model's than with nearest
rounding, on the samples and on others, and nothing but the int8 weights changes, each by at most one step."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kegnet.compression import quantize
from kegnet.compression.rounding import adaround

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _net() -> nn.Module:
    """A small convnet with a strided, padded conv, a depthwise conv and a linear head: every kind of layer the
    rounding reads."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                         nn.ReLU(), nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 5 * 5, 10)).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, torch.Tensor, dict]:
    """The prepared fp32 model, its int8 model (MinMax, 128 Gaussian samples), the re-rounded one, the samples
    and adaround's report."""
    work = tmp_path_factory.mktemp("rounding")
    torch.onnx.export(_net(), (torch.randn(1, 1, 14, 14),), str(work / "fp32.onnx"), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    quantize.prepare(work / "fp32.onnx", work / "prepared.onnx")
    samples = torch.randn(128, 1, 14, 14, generator=torch.Generator().manual_seed(1))
    quantize.quantize(work / "prepared.onnx", work / "int8.onnx", samples, "minmax")
    done = adaround(work / "prepared.onnx", work / "int8.onnx", work / "rounded.onnx", samples, iterations=300)
    return work / "prepared.onnx", work / "int8.onnx", work / "rounded.onnx", samples, done


def test_every_layer_is_rounded_and_its_output_error_falls(models) -> None:
    _, _, _, _, done = models
    assert done["layers"] == 4 and done["skipped"] == 0 and done["samples"] == 128
    assert done["error_adaround"] < 0.9 * done["error_nearest"]


def test_the_logits_move_closer_to_the_fp32_models(models) -> None:
    prepared, int8, rounded, samples, _ = models
    held_out = torch.randn(512, 1, 14, 14, generator=torch.Generator().manual_seed(2))
    for x in (samples, held_out):
        fp = quantize.OnnxModel(prepared)(x)
        before = (quantize.OnnxModel(int8)(x) - fp).pow(2).mean()
        after = (quantize.OnnxModel(rounded)(x) - fp).pow(2).mean()
        assert after < before


def test_only_the_int8_weights_change_by_at_most_one_step(models) -> None:
    _, int8, rounded, _, _ = models
    old = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(int8)).graph.initializer}
    new = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(rounded)).graph.initializer}
    assert old.keys() == new.keys()
    changed = {name for name in old if not np.array_equal(old[name], new[name])}
    assert changed and all(new[name].dtype == np.int8 for name in changed)
    assert all(np.abs(old[n].astype(int) - new[n].astype(int)).max() == 1 for n in changed)
    ops = [[n.op_type for n in onnx.load(str(path)).graph.node] for path in (int8, rounded)]
    assert ops[0] == ops[1]


def test_weights_from_another_model_are_left_alone(models, tmp_path: Path) -> None:
    """The fp32 model must be the one the int8 model was rounded from; given another, nothing changes."""
    _, int8, _, samples, _ = models
    torch.onnx.export(_net().apply(lambda m: torch.nn.init.normal_(m.weight) if hasattr(m, "weight") else None),
                      (torch.randn(1, 1, 14, 14),), str(tmp_path / "other.onnx"), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    quantize.prepare(tmp_path / "other.onnx", tmp_path / "other-prepared.onnx")
    done = adaround(tmp_path / "other-prepared.onnx", int8, tmp_path / "out.onnx", samples, iterations=10)
    assert done["layers"] == 0 and done["skipped"] == 4


def test_rounding_on_the_int8_models_own_inputs_moves_the_logits_closer_too(models, tmp_path: Path) -> None:
    prepared, int8, _, samples, _ = models
    done = adaround(prepared, int8, tmp_path / "asym.onnx", samples, iterations=300, inputs="int8")
    assert done["layers"] == 4 and done["error_adaround"] < done["error_nearest"]
    held_out = torch.randn(512, 1, 14, 14, generator=torch.Generator().manual_seed(2))
    fp = quantize.OnnxModel(prepared)(held_out)
    before = (quantize.OnnxModel(int8)(held_out) - fp).pow(2).mean()
    after = (quantize.OnnxModel(tmp_path / "asym.onnx")(held_out) - fp).pow(2).mean()
    assert after < before


def test_memory_and_step_bounds_shrink_the_samples_not_the_layers(models, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A teacher too large for the bounds (as a 224x224 one) is rounded on fewer samples, a few per step."""
    from kegnet.compression import rounding

    prepared, int8, _, samples, _ = models
    monkeypatch.setattr(rounding, "PASS_BYTES", 64 * 1024)  # the first conv's input and output: 16 samples
    monkeypatch.setattr(rounding, "STEP_MACS", 10_000)  # under one sample of the first conv: one per step
    done = adaround(prepared, int8, tmp_path / "small.onnx", samples, iterations=100)
    assert done["layers"] == 4 and done["samples"] < len(samples)
    assert done["error_adaround"] <= done["error_nearest"]
