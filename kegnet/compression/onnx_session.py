"""One way to open an ONNX model in onnxruntime for the int8 step (kegnet.compression.quantize and
kegnet.compression.bias_correction): on the CPU, with a given number of intra-op threads. onnxruntime is an
optional extra, imported only here and only when called."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def open_session(model: Path | bytes, threads: int) -> Any:
    """An onnxruntime ``InferenceSession`` of ``model`` (a file, or a serialized ModelProto) on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3  # its warnings about unused initializers are not the user's concern
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


__all__ = ["open_session"]
