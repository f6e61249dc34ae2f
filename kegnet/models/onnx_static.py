"""An ONNX graph priced from its shapes alone: nothing is converted, allocated or run.

``profile`` infers every tensor's shape (``onnx.shape_inference.infer_shapes`` with data propagation, so
``Shape -> Gather -> Concat -> Reshape`` chains resolve) on one sample: the graph's batch dimension is set
to 1, so every size is a number (a graph whose work grows faster than its batch is priced at batch 1).
It then refuses what would take memory or time a service cannot grant:

- a tensor (initializer, constant, any node's output) of more than ``max_elements`` elements: a 923-byte
  ``ConstantOfShape`` can ask for 1e9 floats;
- a tensor whose size only a run would tell (a shape computed from data, a free dimension other than the
  batch): its memory and the work that reads it could be anything;
- control flow (``If``, ``Loop``, ``Scan``): its work depends on data.

What is left has a bound: ``MatMul``/``Gemm``/``Conv``/``ConvTranspose`` MACs from the inferred shapes and
the elements of every node's output, a ``kegnet.cost.Profile`` per sample. Local functions are inlined
first, after their inlined node count is bounded.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from kegnet.cost import Profile
from kegnet.errors import CheckpointError, SpecError, reraise_interrupts

log = logging.getLogger(__name__)

_CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})
_EXPORT = "export it with fixed sizes except the batch (torch.onnx.export(..., dynamic_axes={'x': {0: 'batch'}}))"

Shape = tuple[int, ...]
_SMALL = 256  # elements of a shape-arithmetic value evaluated here (a shape has at most 64 dimensions)
_MAX_FOLDS = 8


def profile(model: Any, input_shape: tuple[int, ...], max_elements: int, max_nodes: int) -> Profile:
    """The per-sample ``Profile`` of a parsed, bounded graph on one sample of ``input_shape`` (no batch)."""
    model = _inlined(model, max_nodes)
    control = sorted({n.op_type for n in model.graph.node if n.op_type in _CONTROL_FLOW})
    if control:
        raise SpecError(f"the ONNX graph uses control flow ({', '.join(control)}), whose cost depends on the data; "
                        "export the model without data-dependent branches or loops")
    shapes = _inferred(model, input_shape)
    for _ in range(_MAX_FOLDS):  # shape arithmetic inference does not evaluate (Equal, Where): fold it
        folded = _fold_shapes(model, shapes)
        if folded is None:
            break
        model, shapes = folded, _inferred(folded, input_shape)
    parameters = 0
    for t in model.graph.initializer:
        parameters += _bounded(t.name, tuple(t.dims), max_elements)
    macs = activations = 0
    for node in model.graph.node:
        for out in node.output:
            if not out:
                continue
            shape = shapes.get(out)
            if shape is None:
                raise SpecError(f"the ONNX graph's {node.op_type} node {node.name or out!r} has an output whose size "
                                f"only running the graph would tell; {_EXPORT}")
            activations += _bounded(out, shape, max_elements)
        macs += _node_macs(node, shapes)
    return Profile(parameters, macs, activations)


def _bounded(name: str, shape: Shape, max_elements: int) -> int:
    """The elements of a tensor of ``shape``, refused above ``max_elements``."""
    elements = math.prod(shape)
    if elements > max_elements:
        raise SpecError(f"the ONNX graph's tensor {name[:80]!r} has {elements:,} elements per sample "
                        f"(shape {shape}), above this service's limit of {max_elements:,}")
    return elements


def _node_macs(node: Any, shapes: dict[str, Shape]) -> int:
    """Multiply-accumulates of one node on one sample (0 for ops other than MatMul, Gemm and convolutions)."""
    op = node.op_type
    if op not in ("MatMul", "Gemm", "Conv", "ConvTranspose"):
        return 0
    out, a = shapes[node.output[0]], shapes.get(node.input[0])
    b = shapes.get(node.input[1]) if len(node.input) > 1 else None
    if a is None or b is None or not a or not b:
        raise SpecError(f"the ONNX graph's {op} node {node.name!r} has inputs of sizes only running it would "
                        f"tell; {_EXPORT}")
    if op == "MatMul":
        return math.prod(out) * a[-1]
    if op == "Gemm":
        trans_a = next((att.i for att in node.attribute if att.name == "transA"), 0)
        return math.prod(out) * (a[0] if trans_a else a[-1])
    if op == "Conv":  # W: (C_out, C_in / group, k...)
        return math.prod(out) * math.prod(b[1:])
    return math.prod(a) * math.prod(b[1:])  # ConvTranspose, W: (C_in, C_out / group, k...)


def _inferred(model: Any, input_shape: tuple[int, ...]) -> dict[str, Shape]:
    """Every tensor's shape on one sample (batch 1); a tensor missing from the map has a size inference could
    not determine."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    inits = {t.name for t in probe.graph.initializer}
    graph_input = next(i for i in probe.graph.input if i.name not in inits)
    dims = graph_input.type.tensor_type.shape.dim
    for d, size in zip(dims, (1, *input_shape), strict=True):  # one sample: every shape resolves to numbers
        d.Clear()
        d.dim_value = size
    for output in probe.graph.output:  # its declared batch symbol ("N", "batch") is that same sample
        out_dims = output.type.tensor_type.shape.dim
        if out_dims and not out_dims[0].HasField("dim_value"):
            out_dims[0].Clear()
            out_dims[0].dim_value = 1
    del probe.graph.value_info[:]  # the exporter's symbolic shapes: inferred again from the one sample
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "inconsistent shapes"
        raise CheckpointError(f"the ONNX graph's shapes are inconsistent ({first}); export it again with "
                              "torch.onnx.export") from exc
    g = inferred.graph
    values = [*g.input, *g.value_info, *g.output]
    shapes = {t.name: tuple(t.dims) for t in g.initializer}
    for v in values:
        shape = _shape(v)
        if shape is not None:
            shapes[v.name] = shape
    return shapes


def _shape(value: Any) -> Shape | None:
    """A value's shape, or ``None`` when its rank or a dimension is unknown."""
    t = value.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    out = []
    for d in t.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        else:
            return None
    return tuple(out)


def _inlined(model: Any, max_nodes: int) -> Any:
    """The graph with its local functions inlined, once their inlined node count is within ``max_nodes``
    (a function calling another ten times, nested, multiplies)."""
    if not model.functions:
        return model
    import onnx.inliner

    functions = {(f.domain, f.name): f for f in model.functions}
    memo: dict[tuple[str, str], int] = {}

    def size(key: tuple[str, str], depth: int) -> int:
        if key in memo:
            return memo[key]
        if depth > len(functions):
            raise CheckpointError("the ONNX graph's local functions call each other in a cycle")
        total = sum(size((n.domain, n.op_type), depth + 1) if (n.domain, n.op_type) in functions else 1
                    for n in functions[key].node)
        memo[key] = min(total, max_nodes + 1)
        return memo[key]

    nodes = sum(size((n.domain, n.op_type), 1) if (n.domain, n.op_type) in functions else 1 for n in model.graph.node)
    if nodes > max_nodes:
        raise CheckpointError(f"the ONNX graph has more than {max_nodes} nodes once its functions are inlined, "
                              f"above the limit of {max_nodes}")
    return onnx.inliner.inline_local_functions(model)


def _fold_shapes(model: Any, shapes: dict[str, Shape]) -> Any | None:
    """The graph with the small integer inputs of nodes of unknown output size computed (from ``Shape``s of
    known inputs and small constants, through small intermediate values only) and given as constants, or
    ``None`` when there is none to compute. Only values of at most ``_SMALL`` elements are ever evaluated."""
    import onnx
    from onnx import numpy_helper

    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    consts = {t.name: t for t in g.initializer}
    pending = {i for n in g.node if any(o and o not in shapes for o in n.output) for i in n.input
               if i in producers and i in shapes and math.prod(shapes[i]) <= _SMALL}
    values = {}
    for name in sorted(pending):
        value = _evaluate(name, producers, consts, shapes, model.opset_import)
        if value is not None:
            values[name] = value
    if not values:
        return None
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    for name, value in values.items():
        folded.graph.initializer.append(numpy_helper.from_array(value, f"{name}__kegnet_folded"))
    for node in folded.graph.node:
        for i, name in enumerate(node.input):
            if name in values:
                node.input[i] = f"{name}__kegnet_folded"
    return folded


def _evaluate(target: str, producers: dict[str, Any], consts: dict[str, Any], shapes: dict[str, Shape],
              opsets: Any) -> Any | None:
    """``target``'s value, computed by onnx's reference evaluator from its cone of small values (``Shape``
    nodes read the inferred shapes), or ``None`` when the cone reaches anything large or unknown."""
    import numpy as np
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    nodes: list[Any] = []
    feeds: dict[str, Any] = {}
    todo, seen = [target], set()
    while todo:
        name = todo.pop()
        if name in seen or not name:
            continue
        seen.add(name)
        if name in consts:
            if math.prod(tuple(consts[name].dims)) > _SMALL:
                return None
            feeds[name] = numpy_helper.to_array(consts[name])
            continue
        node = producers.get(name)
        if node is None or any(o and (o not in shapes or math.prod(shapes[o]) > _SMALL) for o in node.output):
            return None
        if node.op_type == "Shape" and node.input[0] in shapes:
            start = next((a.i for a in node.attribute if a.name == "start"), 0)
            end = next((a.i for a in node.attribute if a.name == "end"), None)
            feeds[name] = np.array(shapes[node.input[0]][start:end], dtype=np.int64)
            continue
        if len(nodes) > 4 * _SMALL or node.op_type in _CONTROL_FLOW:
            return None
        nodes.append(node)
        todo.extend(node.input)
    order = {id(n): i for i, n in enumerate(producers.values())}  # the graph's own (topological) order
    nodes.sort(key=lambda n: order[id(n)])
    graph = helper.make_graph(nodes, "shape", [], [helper.make_empty_tensor_value_info(target)],
                              [numpy_helper.from_array(v, k) for k, v in feeds.items()])
    model = helper.make_model(graph, opset_imports=list(opsets))
    try:
        return np.asarray(ReferenceEvaluator(model).run(None, {})[0])
    except Exception as exc:  # noqa: BLE001 - anything the evaluator cannot do leaves the size unknown (refused)
        reraise_interrupts(exc)
        log.info("could not evaluate shape value %s", target, exc_info=True)
        return None
