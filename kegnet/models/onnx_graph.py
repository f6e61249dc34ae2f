"""Any network as an ONNX file: parsed safely, checked, and turned into a torch module by onnx2torch.

An ONNX file is data (a protobuf), not a program, so nothing in it runs while it is read. What it can do
is point elsewhere: tensors stored as *external data* name files, which here would be files of the
server. Those are refused before anything else looks at the graph, so nothing is ever read from disk but
the upload itself. Sizes are bounded (bytes, nodes, initializers) before the checker or the converter
run.

onnx2torch knows opsets up to 17; newer graphs (torch's exporter writes 18+) are converted down, with the
ops that have no older form (GELU) rewritten first. Shapes: the graph must take one input
``(batch, C, H, W)`` or ``(batch, F)`` and give one output ``(batch, classes)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from kegnet.cost import Profile
from kegnet.errors import CheckpointError, SpecError
from kegnet.models import onnx_static

log = logging.getLogger(__name__)

# The newest opset onnx2torch converts (1.5.15; opset 18 changed the Reduce* ops it reads).
CONVERTER_OPSET = 17
# The oldest opset the version converter brings up reliably.
OLDEST_OPSET = 7


@dataclass(frozen=True)
class OnnxLimits:
    """Bounds on an uploaded graph, checked before the checker and the converter see it."""

    max_bytes: int = 1 << 30
    max_nodes: int = 20_000
    max_initializers: int = 20_000
    max_initializer_bytes: int = 1 << 30
    # Elements of any one tensor of the graph (a constant, an initializer, an inferred activation of one
    # sample): 2**26 float32 are 256 MiB. A 923-byte ConstantOfShape asks for 1e9 (4 GB) otherwise.
    max_tensor_elements: int = 1 << 26


@dataclass
class OnnxGraph:
    """A parsed, checked graph ready for conversion, and what it says about itself."""

    proto: Any  # onnx.ModelProto, converted to CONVERTER_OPSET and normalized
    input_shape: tuple[int | None, ...]  # without the batch dimension; None where the graph leaves it free
    num_classes: int | None
    info: dict[str, Any]  # provenance for the manifest: opsets, producer, node and initializer counts


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - the onnx extra is part of every install we ship
        raise CheckpointError("this server cannot read ONNX files (pip install 'kegnet[onnx]')") from exc
    return onnx


def _graphs(graph: Any) -> Iterator[Any]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    onnx = _import_onnx()
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto a graph (or a local function: no initializers) holds: initializers, sparse
    initializers and tensor attributes."""
    onnx = _import_onnx()
    for g in _graphs(graph):
        yield from getattr(g, "initializer", ())
        for sparse in getattr(g, "sparse_initializer", ()):
            yield sparse.values
            yield sparse.indices
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors
                elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                    yield attr.sparse_tensor.values
                    yield attr.sparse_tensor.indices


def _model_tensors(model: Any) -> Iterator[Any]:
    """The tensors of the graph and of every local function."""
    yield from _tensors(model.graph)
    for function in model.functions:
        yield from _tensors(function)


def _tensor_bytes(t: Any) -> int:
    n = len(t.raw_data)
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        n += 8 * len(getattr(t, field))
    return n + sum(len(s) for s in t.string_data)


def parse(data: bytes, limits: OnnxLimits | None = None) -> Any:
    """Parse ``data`` as an ONNX model and refuse what could reach outside the file or is too large."""
    onnx = _import_onnx()
    from google.protobuf.message import DecodeError

    limits = limits or OnnxLimits()
    if len(data) > limits.max_bytes:
        raise CheckpointError(f"the ONNX file is larger than {limits.max_bytes} bytes")
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise CheckpointError("the file is not a valid ONNX model (its protobuf could not be parsed); export it "
                              "with torch.onnx.export(model, example, 'model.onnx')") from exc
    if not model.HasField("graph") or not model.graph.node:
        raise CheckpointError("the ONNX file holds no graph; export it with torch.onnx.export(model, example, "
                              "'model.onnx')")
    # External data names files: on this server they would be the server's files. Refuse before any check
    # or conversion could try to open them, in the graph and in its local functions alike, with one message
    # whatever the path names (nothing on this server is ever looked up for it).
    for t in _model_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
            raise CheckpointError(
                f"the ONNX file keeps tensor {t.name!r} in external data (a separate file), which is refused: "
                "save the model as one file (torch.onnx.export(..., external_data=False), or "
                "onnx.save_model(model, path, save_as_external_data=False))")
    nodes = sum(len(g.node) for g in _graphs(model.graph)) + sum(len(g.node) for f in model.functions
                                                                 for g in _graphs(f))
    if nodes > limits.max_nodes:
        raise CheckpointError(f"the ONNX graph has {nodes} nodes, above the limit of {limits.max_nodes}")
    tensors = list(_model_tensors(model))
    if len(tensors) > limits.max_initializers:
        raise CheckpointError(f"the ONNX graph has {len(tensors)} weight tensors, above the limit of "
                              f"{limits.max_initializers}")
    size = sum(_tensor_bytes(t) for t in tensors)
    if size > limits.max_initializer_bytes:
        raise CheckpointError(f"the ONNX graph's weights take {size} bytes, above the limit of "
                              f"{limits.max_initializer_bytes}")
    try:
        onnx.checker.check_model(model)  # in memory: with no path it opens no file
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "invalid graph"
        raise CheckpointError(f"the ONNX model does not pass onnx's checker: {first}") from exc
    return model


def _opset(model: Any) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def _rewrite_gelu(model: Any) -> None:
    """Gelu (opset 20) has no older form: write it as ``0.5·x·(1 + erf(x/√2))`` (or its tanh form)."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    out: list[Any] = []
    consts: dict[str, float] = {}

    def const(value: float) -> str:
        name = f"kegnet_gelu_const_{len(consts)}"
        if value not in consts.values():
            g.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
            consts[name] = value
            return name
        return next(k for k, v in consts.items() if v == value)

    for i, node in enumerate(g.node):
        if node.op_type != "Gelu" or node.domain not in ("", "ai.onnx"):
            out.append(node)
            continue
        approx = next((a.s.decode() for a in node.attribute if a.name == "approximate"), "none")
        x, y, p = node.input[0], node.output[0], f"kegnet_gelu{i}"
        if approx == "tanh":  # 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
            out += [helper.make_node("Mul", [x, x], [f"{p}_x2"]), helper.make_node("Mul", [f"{p}_x2", x], [f"{p}_x3"]),
                    helper.make_node("Mul", [f"{p}_x3", const(0.044715)], [f"{p}_a"]),
                    helper.make_node("Add", [x, f"{p}_a"], [f"{p}_b"]),
                    helper.make_node("Mul", [f"{p}_b", const(math.sqrt(2 / math.pi))], [f"{p}_c"]),
                    helper.make_node("Tanh", [f"{p}_c"], [f"{p}_t"])]
        else:
            out += [helper.make_node("Mul", [x, const(1 / math.sqrt(2))], [f"{p}_c"]),
                    helper.make_node("Erf", [f"{p}_c"], [f"{p}_t"])]
        out += [helper.make_node("Add", [f"{p}_t", const(1.0)], [f"{p}_u"]),
                helper.make_node("Mul", [x, f"{p}_u"], [f"{p}_v"]),
                helper.make_node("Mul", [f"{p}_v", const(0.5)], [y])]
    del g.node[:]
    g.node.extend(out)


def _normalize(model: Any) -> None:
    """Small rewrites the converter needs: constants become initializers, ``Identity`` of an initializer
    becomes a copy of it (the legacy exporter shares equal weights that way), and ``Reshape`` drops
    ``allowzero`` when its target shape is constant without zeros (then the flag changes nothing)."""
    onnx = _import_onnx()
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    keep = []
    for node in g.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            g.initializer.append(t)
            inits[t.name] = t
            continue
        if node.op_type == "Identity" and node.input[0] in inits:
            t = onnx.TensorProto()
            t.CopyFrom(inits[node.input[0]])
            t.name = node.output[0]
            g.initializer.append(t)
            inits[t.name] = t
            continue
        constant_shape = node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in inits
        if constant_shape and (numpy_helper.to_array(inits[node.input[1]]) != 0).all():
            for attr in [a for a in node.attribute if a.name == "allowzero"]:
                node.attribute.remove(attr)
        keep.append(node)
    del g.node[:]
    g.node.extend(keep)


def _signature(model: Any) -> tuple[tuple[int | None, ...], int | None]:
    """The input shape (without batch) and the class count the graph declares."""
    onnx = _import_onnx()
    g = model.graph
    weights = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in weights]
    if len(inputs) != 1 or len(g.output) != 1:
        raise SpecError(f"the ONNX graph must have one input and one output, it has {len(inputs)} and "
                        f"{len(g.output)}")

    def dims(value: Any) -> list[int | None]:
        shape = value.type.tensor_type.shape
        return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in shape.dim]

    if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise SpecError("the ONNX graph's input must be float32")
    shape_in = dims(inputs[0])
    if len(shape_in) not in (2, 4):
        raise SpecError(f"the ONNX graph's input has {len(shape_in)} dimensions; kegnet takes (batch, C, H, W) "
                        "images or (batch, F) feature vectors")
    if shape_in[0] is not None:
        # Training runs batches of many sizes; a batch baked into the graph's reshapes cannot take them.
        raise SpecError(f"the ONNX graph's batch dimension is fixed at {shape_in[0]}; export it with a dynamic "
                        "batch: torch.onnx.export(..., dynamic_axes={'x': {0: 'batch'}}) or, with dynamo=True, "
                        "dynamic_shapes=({0: torch.export.Dim('batch')},)")
    shape_out = dims(g.output[0])
    classes = shape_out[1] if len(shape_out) == 2 else None
    return tuple(shape_in[1:]), classes


def read_graph(path: str | Path, limits: OnnxLimits | None = None) -> OnnxGraph:
    """Read, check and prepare an uploaded ONNX file for conversion."""
    onnx = _import_onnx()
    from onnx import version_converter

    limits = limits or OnnxLimits()
    path = Path(path)
    if path.stat().st_size > limits.max_bytes:
        raise CheckpointError(f"the ONNX file is larger than {limits.max_bytes} bytes")
    model = parse(path.read_bytes(), limits)
    declared = _signature(model)[0]
    if all(d is not None for d in declared):  # a free size is priced with the spec's (kegnet.preflight)
        static_cost(model, declared, limits)  # before the converter or any run sees the graph
    opset = _opset(model)
    others = sorted({e.domain for e in model.opset_import if e.domain not in ("", "ai.onnx")}
                    & {n.domain for n in model.graph.node})
    if others:
        raise CheckpointError(f"the ONNX graph uses operators of other domains ({', '.join(others)}); export it "
                              "with standard ONNX operators only")
    info: dict[str, Any] = {"opset": opset, "producer": f"{model.producer_name} {model.producer_version}".strip(),
                            "nodes": len(model.graph.node), "initializers": len(model.graph.initializer)}
    try:
        if opset > CONVERTER_OPSET:
            _rewrite_gelu(model)
            model = version_converter.convert_version(model, CONVERTER_OPSET)
        elif opset < OLDEST_OPSET:
            raise CheckpointError(f"the ONNX graph uses opset {opset}; export it with opset {OLDEST_OPSET} or newer")
    except (RuntimeError, ValueError, onnx.checker.ValidationError) as exc:
        raise CheckpointError(f"the ONNX graph (opset {opset}) could not be converted to opset {CONVERTER_OPSET}: "
                              f"{str(exc).strip().splitlines()[-1][:200]}; export it with opset_version="
                              f"{CONVERTER_OPSET}") from exc
    _normalize(model)
    info["converted_opset"] = _opset(model)
    shape, classes = _signature(model)
    return OnnxGraph(model, shape, classes, info)


def static_profile(path: str | Path, limits: OnnxLimits | None = None, input_shape: tuple[int, ...] | None = None
                   ) -> tuple[tuple[tuple[int | None, ...], int | None], Profile | None]:
    """An uploaded graph read and priced without converting or running it: ((input shape without the batch,
    ``None`` where free; class count), its per-sample ``Profile`` on ``input_shape`` (default: the declared
    one; ``None`` when a size is left free and none is given). Raises ``CheckpointError``/``SpecError``."""
    limits = limits or OnnxLimits()
    path = Path(path)
    if path.stat().st_size > limits.max_bytes:
        raise CheckpointError(f"the ONNX file is larger than {limits.max_bytes} bytes")
    model = parse(path.read_bytes(), limits)
    declared, classes = _signature(model)
    shape = input_shape if input_shape is not None and len(input_shape) == len(declared) else declared
    if any(d is None for d in shape):
        return (declared, classes), None
    return (declared, classes), static_cost(model, tuple(int(d) for d in shape), limits)  # type: ignore[arg-type]


def static_cost(model: Any, input_shape: tuple[int | None, ...], limits: OnnxLimits) -> Profile:
    """A parsed graph's per-sample profile on ``input_shape`` (without the batch) from its inferred shapes
    (kegnet.models.onnx_static), refused when a tensor is above ``limits.max_tensor_elements`` or of a size
    only a run would tell."""
    return onnx_static.profile(model, input_shape, limits.max_tensor_elements, limits.max_nodes)


def to_torch(graph: OnnxGraph) -> nn.Module:
    """Convert with onnx2torch: a ``torch.fx.GraphModule`` whose convs and Gemms are ``nn.Conv2d`` and
    ``nn.Linear`` (module names are the graph's node names, with ``/`` kept), in eval mode."""
    try:
        from onnx2torch import convert
    except ImportError as exc:  # pragma: no cover
        raise CheckpointError("this server cannot convert ONNX files (pip install 'kegnet[onnx]')") from exc
    try:
        module = convert(graph.proto)
    except NotImplementedError as exc:
        raise SpecError(f"the ONNX graph uses an operator kegnet cannot convert to PyTorch ({exc}); export the "
                        f"model with opset_version={CONVERTER_OPSET} and standard layers") from exc
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise SpecError(f"the ONNX graph could not be converted to PyTorch ({type(exc).__name__}: {exc})") from exc
    return module.eval()


__all__ = ["CONVERTER_OPSET", "OnnxGraph", "OnnxLimits", "parse", "read_graph", "static_cost", "static_profile",
           "to_torch"]
