"""Empirical bias correction of an INT8 (QDQ) ONNX model on synthetic samples (Nagel et al. 2019, section 4.2).

Rounding weights and inputs to 8 bits shifts the mean of a layer's output, and the next layers carry the shift
on. For each Conv or Gemm whose bias is quantized (an int32 initializer behind a DequantizeLinear), in graph
order, the mean of its output per channel over the samples is measured in the fp32 model and in the int8 model
as corrected so far; the difference is added to the bias, in the bias's own int32 steps. Each layer so corrects
the shift left by the layers before it. The samples are the job's calibration samples (never data).

Both models are read by node name: onnxruntime's quantizer keeps the names of the nodes it quantizes, and the
fp32 model here is the one it quantized (``kegnet.compression.quantize.prepare``'s output). Outputs are compared
before the activation: the quantizer folds a Relu into the output's quantization, so the int8 graph's Conv
output is the pre-activation one, as the fp32 graph's is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kegnet.compression.onnx_session import intermediate_values
from kegnet.errors import Cancelled

log = logging.getLogger(__name__)

BATCH = 16  # samples per run: the fp32 pass returns every corrected layer's output at once
LAYERS = ("Conv", "Gemm")


@dataclass
class _Layer:
    node: str  # the node's name, equal in both models
    bias: str  # the int32 initializer of the quantized bias
    scale: str  # the bias's scale initializer (per channel or one)


def _biased_layers(model: Any) -> list[_Layer]:
    """The Conv/Gemm nodes of ``model`` (an int8 QDQ ModelProto) whose bias is an int32 initializer behind a
    DequantizeLinear, in graph order (onnx graphs are topologically sorted)."""
    from onnx import TensorProto

    initializers = {i.name: i for i in model.graph.initializer}
    dequantized = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    layers = []
    for node in model.graph.node:
        if node.op_type not in LAYERS or len(node.input) < 3 or not node.name:
            continue
        dq = dequantized.get(node.input[2])
        if dq is None or initializers.get(dq.input[0]) is None:
            continue
        if initializers[dq.input[0]].data_type != TensorProto.INT32 or dq.input[1] not in initializers:
            continue
        layers.append(_Layer(node.name, dq.input[0], dq.input[1]))
    return layers


def _output_of(model: Any, node_name: str) -> str:
    return next(n.output[0] for n in model.graph.node if n.name == node_name)


def _channel_means(model: Any, outputs: list[str], samples: np.ndarray, threads: int) -> dict[str, np.ndarray]:
    """The mean over samples (and positions) of each tensor in ``outputs`` per channel (axis 1):
    ``{name: (C,)}``."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for values in intermediate_values(model, outputs, samples, threads, BATCH):
        for name, value in values.items():
            axes = tuple(a for a in range(value.ndim) if a != 1)
            sums[name] = sums.get(name, 0.0) + value.astype(np.float64).sum(axis=axes)
            counts[name] = counts.get(name, 0) + value.size // value.shape[1]
    return {name: s / counts[name] for name, s in sums.items()}


def correct_bias(fp32: Path, int8: Path, out: Path, samples: torch.Tensor, threads: int = 1,
                 should_cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Write ``out``: ``int8`` (a QDQ model quantized from ``fp32``) with each quantized Conv/Gemm bias shifted so
    that the layer's mean output per channel on ``samples`` ``(N, *input_shape)`` matches ``fp32``'s, layer by
    layer in graph order. Returns ``{"layers", "skipped", "mean_abs_shift"}``: layers corrected, Conv/Gemm nodes
    left as they are (no quantized bias, or no node of that name in ``fp32``), and the mean absolute bias change
    in the output's units."""
    import onnx
    from onnx import numpy_helper

    x = samples.detach().float().cpu().numpy()
    reference, model = onnx.load(str(fp32)), onnx.load(str(int8))
    in_reference = {n.name for n in reference.graph.node}
    layers = [layer for layer in _biased_layers(model) if layer.node in in_reference]
    targets = _layer_means(reference, [layer.node for layer in layers], x, threads)
    initializers = {i.name: i for i in model.graph.initializer}
    shifts = []
    for layer in layers:
        if should_cancel is not None and should_cancel():
            raise Cancelled("cancelled while correcting the int8 model's biases")
        current = _layer_means(model, [layer.node], x, threads)[layer.node]
        shift = targets[layer.node] - current
        bias, scale = (numpy_helper.to_array(initializers[n]) for n in (layer.bias, layer.scale))
        steps = np.rint(shift / scale.astype(np.float64)).astype(np.int64)
        corrected = np.clip(bias.astype(np.int64) + steps, np.iinfo(np.int32).min, np.iinfo(np.int32).max)
        initializers[layer.bias].CopyFrom(numpy_helper.from_array(corrected.astype(np.int32), layer.bias))
        shifts.append(float(np.abs(shift).mean()))
    onnx.save(model, str(out))
    skipped = sum(1 for n in model.graph.node if n.op_type in LAYERS) - len(layers)
    done = {"layers": len(layers), "skipped": skipped, "mean_abs_shift": float(np.mean(shifts)) if shifts else 0.0}
    log.info("bias correction: %d layers corrected, %d left, mean shift %.3g", done["layers"], skipped,
             done["mean_abs_shift"])
    return done


def _layer_means(model: Any, nodes: list[str], x: np.ndarray, threads: int) -> dict[str, np.ndarray]:
    """``{node name: (C,)}``: the mean output per channel of each named node of ``model`` on ``x``."""
    names = {node: _output_of(model, node) for node in nodes}
    means = _channel_means(model, list(names.values()), x, threads)
    return {node: means[name] for node, name in names.items()}


__all__ = ["correct_bias"]
