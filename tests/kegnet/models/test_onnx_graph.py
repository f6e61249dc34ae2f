"""ONNX teachers: both torch exporters, several families, the whole pipeline, and files that must be refused."""

from __future__ import annotations

import builtins
import io
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from kegnet import ModelSpec, create_model, load_student, run_pipeline
from kegnet.checkpoint import open_teacher
from kegnet.errors import CheckpointError, SpecError
from kegnet.models.onnx_graph import CONVERTER_OPSET, OnnxLimits, parse, read_graph
from kegnet.models.taps import batchnorm_layers
from kegnet.tasks.classify import FOLDED_BATCHNORM
from tests.conftest import tiny_config

IMG = (3, 32, 32)
FAMILIES = {  # a representative subset: plain convs, depthwise + SE + hardswish, attention + GELU, concat, groups
    "resnet18": ("torchvision:resnet18", {}),
    "mobilenet_v3_small": ("torchvision:mobilenet_v3_small", {}),
    "vit": ("timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}),
    "googlenet": ("torchvision:googlenet", {}),
    "regnetx_002": ("timm:regnetx_002", {}),
}
DYNAMO = ("resnet18", "mobilenet_v3_small", "vit")  # the newer exporter is slower: a subset


def _module(family: str, num_classes: int = 10) -> nn.Module:
    arch, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    return create_model(arch, input_shape=IMG, num_classes=num_classes, **kwargs).eval()


def _export(model: nn.Module, path: Path, *, dynamo: bool, dynamic_batch: bool = True) -> Path:
    """What a user would run; with a dynamic batch size (else the graph may bake batch 2 into reshapes)."""
    x = torch.randn(2, *IMG)
    level = logging.getLogger("torch.onnx").level
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:
                shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic_batch else None
                torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False, verbose=False,
                                  input_names=["x"], dynamic_shapes=shapes)
            else:
                axes = {"x": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
                torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                                  output_names=["logits"], dynamic_axes=axes)
    finally:
        logging.getLogger("torch.onnx").setLevel(level)
    return path


@pytest.mark.parametrize(("family", "dynamo"), [(f, False) for f in FAMILIES] + [(f, True) for f in DYNAMO],
                         ids=lambda v: v if isinstance(v, str) else ("dynamo" if v else "legacy"))
def test_exported_graph_loads_with_its_shape_and_classes(tmp_path: Path, family: str, dynamo: bool) -> None:
    model = _module(family, num_classes=7)
    path = _export(model, tmp_path / "m.onnx", dynamo=dynamo)
    proto = onnx.load(str(path))
    opset = next(e.version for e in proto.opset_import if e.domain in ("", "ai.onnx"))
    assert (opset > CONVERTER_OPSET) == dynamo  # the new exporter writes 18+, converted down on reading
    assert not any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)

    loaded = open_teacher(path, ModelSpec(arch="onnx"))

    assert loaded.spec.input_shape == IMG and loaded.spec.num_classes == 7
    assert loaded.architecture["source"] == "onnx" and loaded.architecture["opset"] == opset
    assert loaded.architecture["converted_opset"] == min(opset, CONVERTER_OPSET)
    x = torch.randn(3, *IMG, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(x), loaded.model(x)
    torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()) + 1e-5, rtol=1e-4)


def test_pipeline_on_an_onnx_resnet18(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    teacher = _module("resnet18")
    path = _export(teacher, tmp_path / "teacher.onnx", dynamo=False)
    layers = ["layer1/layer1/0/conv1/Conv", "layer1/layer1/0/conv2/Conv", "fc/Gemm"]
    config = tiny_config("kegnet", compression={"layers": layers, "rank_method": "fraction", "rank_fraction": 0.25,
                                                "n_iter_max": 1})
    config = config.model_copy(update={"export_portable": False, "export_onnx": True})
    out = tmp_path / "out"

    result = run_pipeline(path, ModelSpec(arch="onnx"), config, out, device="cpu", seed=0)

    m = json.loads((out / "manifest.json").read_text())
    assert m["spec"]["input_shape"] == list(IMG) and m["spec"]["num_classes"] == 10
    assert m["architecture"]["source"] == "onnx" and m["architecture"]["opset"] == 17
    assert {p["name"] for p in m["classify"]["plan"]["layers"]} == set(layers)
    assert m["parameters"]["student"] < m["parameters"]["teacher"]
    assert m["classify"]["onnx_check"]["max_abs_diff"] < 1e-3
    # The exporter folded BatchNorm into the convs: the generators had nothing to match, and the job says so.
    assert any(w.startswith(FOLDED_BATCHNORM) for w in m["warnings"])
    assert m["classify"]["confidence"]["calibrated"] is False and m["classify"]["confidence"]["level"] != "high"
    x = torch.randn(5, *IMG, generator=torch.Generator().manual_seed(3))
    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = result.student(x)
        torch.testing.assert_close(torch.from_numpy(logits), want, atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="onnx_teacher"):
            load_student(out)
        reloaded = load_student(out, onnx_teacher=path)
        torch.testing.assert_close(reloaded(x), want, atol=1e-5, rtol=1e-5)


def test_the_warnings_advice_keeps_batchnorm_in_the_graph(tmp_path: Path) -> None:
    # torch.onnx.export(..., dynamo=False, do_constant_folding=False), as FOLDED_BATCHNORM's warning says.
    path = tmp_path / "kept.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_module("resnet18"), (torch.randn(2, *IMG),), str(path), dynamo=False,
                          do_constant_folding=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    assert batchnorm_layers(open_teacher(path, ModelSpec(arch="onnx")).model)
    assert not batchnorm_layers(open_teacher(_export(_module("resnet18"), tmp_path / "folded.onnx", dynamo=False),
                                          ModelSpec(arch="onnx")).model)


# Bad and hostile files ------------------------------------------------------------------------------------

def _tiny_graph(*, external: str | None = None, inputs: int = 1, opset: int = 17) -> onnx.ModelProto:
    """``logits = x @ W`` with x (N, 4) and W (4, 3); W kept in external data at ``external`` if given."""
    w = numpy_helper.from_array(np.ones((4, 3), dtype=np.float32), "W")
    if external is not None:
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for key, value in (("location", external), ("offset", "0"), ("length", "48")):
            entry = w.external_data.add()
            entry.key, entry.value = key, value
    xs = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, ["N", 4]) for i in range(inputs)]
    nodes = [helper.make_node("MatMul", ["x0", "W"], ["h"])]
    if inputs == 2:  # logits = (x0 + x1) @ W
        nodes = [helper.make_node("Add", ["x0", "x1"], ["s"]), helper.make_node("MatMul", ["s", "W"], ["h"])]
    nodes.append(helper.make_node("Identity", ["h"], ["logits"]))
    graph = helper.make_graph(nodes, "tiny", xs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                              [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_a_tiny_graph_loads(tmp_path: Path) -> None:
    path = tmp_path / "ok.onnx"
    path.write_bytes(_tiny_graph().SerializeToString())
    loaded = open_teacher(path, ModelSpec(arch="onnx"))
    assert loaded.spec.input_shape == (4,) and loaded.spec.num_classes == 3
    with torch.no_grad():
        assert torch.allclose(loaded.model(torch.ones(2, 4)), torch.full((2, 3), 4.0))


@pytest.mark.parametrize("target", ["secret", "/etc/passwd", "../../secret", "missing-file"])
def test_external_data_is_refused_without_opening_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           target: str) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(np.ones((4, 3), dtype=np.float32).tobytes())
    location = str(secret) if target == "secret" else target
    path = tmp_path / "upload" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(_tiny_graph(external=location).SerializeToString())

    opened: list[str] = []
    real_open, real_io_open, real_os_open = builtins.open, io.open, os.open

    def spy(file: object, *args: object, **kwargs: object) -> object:
        opened.append(os.fspath(file) if isinstance(file, str | os.PathLike) else repr(file))
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    def spy_os(file: object, *args: object, **kwargs: object) -> int:
        opened.append(os.fspath(file))  # type: ignore[arg-type]
        return real_os_open(file, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    monkeypatch.setattr(os, "open", spy_os)
    try:
        with pytest.raises(CheckpointError, match="external data") as info:
            open_teacher(path, ModelSpec(arch="onnx"))
    finally:
        monkeypatch.setattr(builtins, "open", real_open)
        monkeypatch.setattr(io, "open", real_io_open)
        monkeypatch.setattr(os, "open", real_os_open)
    assert "'W'" in str(info.value) and "not found" not in str(info.value).lower()
    assert not any("secret" in p or "passwd" in p or "missing-file" in p for p in opened), opened
    with pytest.raises(CheckpointError, match="external data"):
        parse(path.read_bytes())


def test_external_data_inside_a_subgraph_is_refused() -> None:
    inner = _tiny_graph(external="/etc/passwd").graph
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    node = helper.make_node("If", ["c"], ["logits"], then_branch=inner, else_branch=inner)
    graph = helper.make_graph([node], "outer", [cond], [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                                       None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(CheckpointError, match="external data"):
        parse(model.SerializeToString())


def test_oversize_graphs_are_refused(tmp_path: Path) -> None:
    path = _export(_module("resnet18"), tmp_path / "r.onnx", dynamo=False)
    size = path.stat().st_size
    for limits, message in [(OnnxLimits(max_bytes=size - 1), "larger than"),
                            (OnnxLimits(max_nodes=10), "nodes, above the limit of 10"),
                            (OnnxLimits(max_initializers=5), "weight tensors, above the limit of 5"),
                            (OnnxLimits(max_initializer_bytes=1 << 20), "bytes, above the limit")]:
        with pytest.raises(CheckpointError, match=message):
            open_teacher(path, ModelSpec(arch="onnx"), onnx_limits=limits)
    with pytest.raises(SpecError, match="above this service's limit"):
        open_teacher(path, ModelSpec(arch="onnx"), max_parameters=1_000_000)


@pytest.mark.parametrize("data", [b"\x00\x01garbage\xff" * 50, b"not an onnx file at all", b"PK\x03\x04" + b"x" * 100,
                                  b"\x08\x07"])
def test_garbage_is_refused_with_a_clear_message(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="ONNX") as info:
        open_teacher(path, ModelSpec(arch="onnx"))
    assert "torch.onnx.export" in str(info.value)


def test_graph_that_fails_the_checker_is_refused(tmp_path: Path) -> None:
    model = _tiny_graph()
    model.graph.node[0].input[1] = "nowhere"  # an input nothing produces
    with pytest.raises(CheckpointError, match="checker"):
        parse(model.SerializeToString())


def test_two_inputs_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "two.onnx"
    path.write_bytes(_tiny_graph(inputs=2).SerializeToString())
    with pytest.raises(SpecError, match="one input and one output, it has 2 and 1"):
        open_teacher(path, ModelSpec(arch="onnx"))


def test_spec_contradicting_the_graph_is_refused(tmp_path: Path) -> None:
    path = _export(_module("resnet18"), tmp_path / "r.onnx", dynamo=False)
    with pytest.raises(SpecError, match=r"input_shape 3,64,64 does not match the ONNX graph's input 3,32,32"):
        open_teacher(path, ModelSpec(arch="onnx", input_shape=(3, 64, 64)))
    with pytest.raises(SpecError, match="num_classes 5 does not match"):
        open_teacher(path, ModelSpec(arch="onnx", num_classes=5))
    with pytest.raises(SpecError, match="no arch_kwargs"):
        open_teacher(path, ModelSpec(arch="onnx", arch_kwargs={"img_size": 32}))
    same = open_teacher(path, ModelSpec(arch="onnx", input_shape=IMG, num_classes=10))
    assert same.spec.input_shape == IMG


def test_free_input_size_needs_input_shape(tmp_path: Path) -> None:
    model = _tiny_graph()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "F"
    path = tmp_path / "free.onnx"
    path.write_bytes(model.SerializeToString())
    assert read_graph(path).input_shape == (None,)
    with pytest.raises(SpecError, match="leaves its input size free"):
        open_teacher(path, ModelSpec(arch="onnx"))
    assert open_teacher(path, ModelSpec(arch="onnx", input_shape=(4,))).spec.num_classes == 3


def test_fixed_batch_graph_is_refused_or_runs_at_other_batches(tmp_path: Path) -> None:
    path = _export(_module("vit"), tmp_path / "fixed.onnx", dynamo=False, dynamic_batch=False)
    try:
        loaded = open_teacher(path, ModelSpec(arch="onnx"))
    except SpecError:
        return  # refused up front with a message: fine
    with torch.no_grad():
        assert loaded.model(torch.randn(5, *IMG)).shape == (5, 10)
