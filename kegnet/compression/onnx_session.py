"""One way to open an ONNX model in onnxruntime for the int8 step (kegnet.compression.quantize,
kegnet.compression.bias_correction, kegnet.compression.equalization, kegnet.compression.rounding): on the CPU,
with a given number of intra-op threads; one way to read a node's attribute; and one way to read a model's
intermediate tensors batch by batch. onnxruntime is an optional extra, imported only here and only when called."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def open_session(model: Path | bytes, threads: int) -> Any:
    """An onnxruntime ``InferenceSession`` of ``model`` (a file, or a serialized ModelProto) on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3  # its warnings about unused initializers are not the user's concern
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def attribute(node: Any, name: str, default: Any) -> Any:
    """The value of ``node``'s (a NodeProto) attribute ``name``, or ``default`` where it has none."""
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def intermediate_values(model: Any, tensors: list[str], samples: np.ndarray, threads: int,
                        batch: int) -> Iterator[dict[str, np.ndarray]]:
    """``{tensor: value}`` of each tensor named in ``tensors`` for each ``batch`` of ``samples`` ``(N, ...)``, in
    order: the tensors are made graph outputs of a copy of ``model`` (a ModelProto)."""
    import onnx
    from onnx import TensorProto, helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                              for name in tensors if name not in known)
    session = open_session(probe.SerializeToString(), threads)
    input_name = session.get_inputs()[0].name
    for start in range(0, len(samples), batch):
        values = session.run(tensors, {input_name: samples[start:start + batch]})
        yield dict(zip(tensors, values, strict=True))


__all__ = ["attribute", "intermediate_values", "open_session"]
