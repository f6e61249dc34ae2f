"""A smaller file for the same ONNX model: what a small int8 model's bytes are spent on besides its weights.

onnxruntime's quantizer names every tensor after the one it quantizes ("conv2.last.weight_quantized_scale"),
keeps the exporter's metadata, shape annotations and default-valued attributes, and gives every int32 bias an
explicit all-zero zero point. On the LeNet-5 student (15,000 int8 weights) that was a third of
``student.int8.onnx`` (31,476 bytes, 20,000 of them tensors; docs/benchmarks.md, issue 22). ``compact``
rewrites the graph without them: internal tensors get short names (the graph's input and output names are
kept); node names, doc strings, metadata, value_info, unused opset imports, attributes set to their operator's
default and the biases' all-zero zero points (an optional input of DequantizeLinear whose default is zero) go.
The rewrite is checked: the compacted model must give bit-identical outputs on the samples given, or the
original is kept.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from kegnet.compression.onnx_session import open_session
from kegnet.errors import reraise_interrupts

log = logging.getLogger(__name__)


def _drop_zero_bias_zero_points(graph: Any) -> None:
    """The int32 biases' all-zero zero points. Not the int8 weights' nor the uint8 activations': without them
    onnxruntime stops fusing a Q/DQ pair into its int8 kernels (outputs changed on a bias-corrected LeNet-5)."""
    import onnx
    from onnx import numpy_helper

    initializers = {t.name: t for t in graph.initializer}
    dropped = set()
    for node in graph.node:
        zero_point = initializers.get(node.input[2]) if node.op_type == "DequantizeLinear" and len(node.input) == 3 \
            else None
        if zero_point is not None and zero_point.data_type == onnx.TensorProto.INT32 and \
                not numpy_helper.to_array(zero_point).any():
            dropped.add(node.input[2])
            del node.input[2]
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used or t.name not in dropped]  # only the zero points go
    del graph.initializer[:]
    graph.initializer.extend(kept)


# Attributes whose value is the operator's default (ONNX operator specs): written out by exporters, not needed.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "Conv": {"auto_pad": b"NOTSET", "dilations": 1, "group": 1, "pads": 0, "strides": 1},
    "MaxPool": {"auto_pad": b"NOTSET", "ceil_mode": 0, "dilations": 1, "pads": 0, "storage_order": 0, "strides": 1},
    "AveragePool": {"auto_pad": b"NOTSET", "ceil_mode": 0, "pads": 0, "strides": 1},
    "Gemm": {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0},
}


def _drop_default_attributes(graph: Any) -> None:
    from onnx import helper

    for node in graph.node:
        defaults = _DEFAULTS.get(node.op_type, {})
        kept = []
        for attribute in node.attribute:
            value = helper.get_attribute_value(attribute)
            default = defaults.get(attribute.name)
            is_default = default is not None and (
                all(v == default for v in value) if isinstance(value, list) else value == default)
            if not is_default:
                kept.append(attribute)
        del node.attribute[:]
        node.attribute.extend(kept)


def _short_names(graph: Any) -> None:
    """Every tensor but the graph's inputs and outputs renamed to a short hexadecimal id."""
    fixed = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in fixed:
            return name
        return names.setdefault(name, format(len(names), "x"))

    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
        tensor.ClearField("doc_string")
        del tensor.metadata_props[:]
    for node in graph.node:
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
        for field in ("name", "doc_string"):
            node.ClearField(field)
        del node.metadata_props[:]
    for value in (*graph.input, *graph.output):
        value.ClearField("doc_string")
        del value.metadata_props[:]
    del graph.value_info[:]


def compact(source: Path, path: Path, samples: np.ndarray, threads: int = 1) -> dict[str, int]:
    """Write ``path``: ``source`` rewritten as the module says, or ``source`` itself where the rewrite changes any
    output on ``samples`` ``(N, *input_shape)`` (bit for bit). Returns ``{"bytes_before", "bytes_after"}``."""
    import onnx

    model = onnx.load(str(source))
    graph = model.graph
    if any(n.op_type in ("If", "Loop", "Scan") for n in graph.node):  # subgraphs read outer names: leave as is
        shutil.copyfile(source, path)
        return {"bytes_before": source.stat().st_size, "bytes_after": source.stat().st_size}
    _drop_zero_bias_zero_points(graph)
    _drop_default_attributes(graph)
    _short_names(graph)
    used_domains = {n.domain for n in graph.node} | {""}
    imports = [o for o in model.opset_import if o.domain in used_domains or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(imports)
    del model.metadata_props[:]
    for field in ("doc_string", "producer_version"):
        model.ClearField(field)
    onnx.save(model, str(path))
    before = open_session(source, threads)
    feed = {before.get_inputs()[0].name: samples.astype(np.float32)}
    expected = before.run(None, feed)
    try:
        outputs = open_session(path, threads).run(None, feed)
        same = all(np.array_equal(a, b) for a, b in zip(expected, outputs, strict=True))
    except Exception as error:  # noqa: BLE001 - any failure of the rewritten file: the original still works
        reraise_interrupts(error)
        log.warning("compacting %s gave a file onnxruntime could not run (%s); kept as it is", source.name, error)
        same = False
    else:
        if not same:
            log.warning("compacting %s changed its outputs; kept as it is", source.name)
    if not same:
        shutil.copyfile(source, path)
    return {"bytes_before": source.stat().st_size, "bytes_after": path.stat().st_size}


__all__ = ["compact"]
