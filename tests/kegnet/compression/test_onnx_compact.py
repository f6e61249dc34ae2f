"""A smaller int8 file with the same outputs bit for bit, or the file as it was."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kegnet.compression import onnx_compact, quantize
from kegnet.compression.onnx_session import open_session

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def int8(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A small convnet's QDQ int8 model, as onnxruntime writes it, and samples."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 3, 1), nn.Conv2d(3, 8, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 10 * 10, 10)).eval()
    work = tmp_path_factory.mktemp("compact")
    torch.onnx.export(net, (torch.randn(1, 1, 14, 14),), str(work / "fp32.onnx"), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    quantize.prepare(work / "fp32.onnx", work / "prepared.onnx")
    samples = torch.randn(64, 1, 14, 14, generator=torch.Generator().manual_seed(1))
    quantize.quantize(work / "prepared.onnx", work / "int8.onnx", samples, "minmax")
    return work / "int8.onnx", samples.numpy()


def _outputs(path: Path, x: np.ndarray) -> np.ndarray:
    return open_session(path, 1).run(None, {"x": x})[0]


def test_compacting_keeps_every_output_bit_for_bit_in_a_smaller_file(int8, tmp_path: Path) -> None:
    source, x = int8
    sizes = onnx_compact.compact(source, tmp_path / "compact.onnx", x)
    assert sizes == {"bytes_before": source.stat().st_size, "bytes_after": (tmp_path / "compact.onnx").stat().st_size}
    assert sizes["bytes_after"] < 0.8 * sizes["bytes_before"]
    held_out = np.random.default_rng(2).standard_normal((32, 1, 14, 14), dtype=np.float32)
    assert np.array_equal(_outputs(source, held_out), _outputs(tmp_path / "compact.onnx", held_out))
    model = onnx.load(str(tmp_path / "compact.onnx"))
    onnx.checker.check_model(model)
    assert [v.name for v in model.graph.input] == ["x"] and [v.name for v in model.graph.output] == ["logits"]
    assert max(len(t.name) for t in model.graph.initializer) <= 3 and not model.graph.value_info
    assert not any(a.name in ("strides", "group", "dilations") for n in model.graph.node for a in n.attribute)
    int32 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT32}  # the biases
    assert int32 and all(len(n.input) == 2 for n in model.graph.node
                         if n.op_type == "DequantizeLinear" and n.input[0] in int32)


def test_a_rewrite_that_changes_outputs_keeps_the_file_as_it_was(int8, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    source, x = int8

    def spoil(graph) -> None:  # a rewrite gone wrong: one bias off by a step
        bias = next(t for t in graph.initializer if t.data_type == onnx.TensorProto.INT32)
        values = onnx.numpy_helper.to_array(bias) + 1
        bias.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.int32), bias.name))

    monkeypatch.setattr(onnx_compact, "_drop_zero_bias_zero_points", spoil)
    sizes = onnx_compact.compact(source, tmp_path / "compact.onnx", x)
    assert (tmp_path / "compact.onnx").read_bytes() == source.read_bytes()
    assert sizes["bytes_after"] == sizes["bytes_before"]


def test_a_rewrite_onnxruntime_cannot_load_keeps_the_file_as_it_was(int8, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    source, x = int8

    def break_graph(graph) -> None:  # a rewrite gone wrong: a node reads a tensor nothing makes
        graph.node[-1].input[0] = "nowhere"

    monkeypatch.setattr(onnx_compact, "_drop_default_attributes", break_graph)
    sizes = onnx_compact.compact(source, tmp_path / "compact.onnx", x)
    assert (tmp_path / "compact.onnx").read_bytes() == source.read_bytes()
    assert sizes["bytes_after"] == sizes["bytes_before"]
