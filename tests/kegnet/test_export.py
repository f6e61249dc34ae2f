"""student.safetensors: the same student always gives the same bytes."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from kegnet.export import write_weights


def test_the_same_student_gives_the_same_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    # Several metadata keys: safetensors itself wrote them in a random order (one map per file).
    metadata = {f"key{i}": f'{{"value": {i}}}' for i in range(8)}
    files = [tmp_path / f"s{i}.safetensors" for i in range(6)]
    for path in files:
        write_weights(student, path, metadata)
    assert len({path.read_bytes() for path in files}) == 1
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == metadata
        assert torch.equal(f.get_tensor("2.weight"), student[2].weight.detach())


def test_student_onnx_carries_no_debug_info(tmp_path: Path) -> None:
    """The exporter's per-node stack traces name this server's files; the delivered file holds none of them."""
    import pytest

    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from kegnet.export import export_onnx

    student = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    path = tmp_path / "student.onnx"
    assert export_onnx(student, (1, 8, 8), path) is None
    model = onnx.load(str(path))
    assert {n.op_type for n in model.graph.node} >= {"Conv", "Relu", "Gemm"}
    assert all(len(n.metadata_props) == 0 and not n.doc_string for n in model.graph.node)
    assert str(Path(__file__).parents[2]).encode() not in path.read_bytes()  # no path of this checkout
