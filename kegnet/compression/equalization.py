"""Range equalization inside factorized layers before INT8 (after Nagel et al. 2019's cross-layer equalization).

A factorized layer is two or three linear maps with nothing between them (Tucker-2: ``first`` -> ``core`` ->
``last``; SVD: two Linear layers). The tensor between two of them is quantized per tensor (one uint8 scale for
all its channels), but its channels can span very different ranges: after fine-tuning, one channel of the
rank-r tensor may reach 30 times another's. The quiet channels then keep few of the 256 steps, and the next map
can amplify their rounding: measured on the Fashion lcnet_050 student (docs/benchmarks.md, issue 22), its plain
MinMax int8 model (7-bit weights) reached 70.2% on real data against 76.8% in fp32, its equalized one 75.7%.
(With 8-bit weights it fell to 11.2%, mostly to the CPU's saturating int8 products; kegnet.compression.quantize.)

Because nothing non-linear sits between the two maps, channel ``i`` can be multiplied by ``s_i`` in the first
map (its weights and bias) and divided by ``s_i`` in the second's input weights without changing the fp32
function. ``s_i`` brings every channel to the mean range: the largest absolute value of the channel over the
calibration samples (the job's synthetic samples, never data). Pairs found: a Conv whose output feeds only a
Conv with one group (any kernel), or a Gemm whose output feeds only a Gemm, with weights (and biases) held in
initializers used by no other node. A user's teacher without such pairs is left as it is.

Shapes: Conv weights ``(C_out, C_in/g, kH, kW)``; Gemm weights ``(out, in)`` with ``transB=1``, ``(in, out)``
otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kegnet.compression.onnx_session import attribute, intermediate_values
from kegnet.errors import Cancelled

log = logging.getLogger(__name__)

BATCH = 64
# Scales stay within this factor of 1: a channel that is (almost) silent on the synthetic samples may not be on
# real inputs, and an unbounded scale would blow it up there.
MAX_SCALE = 32.0


@dataclass
class _Pair:
    first: Any  # NodeProto: its output channel i is scaled by s_i
    second: Any  # NodeProto: its input channel i is divided by s_i

    @property
    def between(self) -> str:
        return self.first.output[0]


def _pairs(model: Any) -> list[_Pair]:
    """The linear pairs of ``model`` (a ModelProto) that can be equalized exactly, in graph order."""
    initializers = {i.name for i in model.graph.initializer}
    users: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}

    def owned(node: Any) -> bool:  # weights (and bias) are initializers that only this node reads
        params = node.input[1:]
        return all(p in initializers and len(users.get(p, [])) == 1 for p in params if p)

    pairs = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or node.output[0] in outputs:
            continue
        following = users.get(node.output[0], [])
        if len(following) != 1 or following[0].op_type != node.op_type or following[0].input[0] != node.output[0]:
            continue
        second = following[0]
        if node.op_type == "Conv" and attribute(second, "group", 1) != 1:
            continue
        if node.op_type == "Gemm" and (attribute(node, "transA", 0) or attribute(second, "transA", 0)):
            continue
        if owned(node) and owned(second):
            pairs.append(_Pair(node, second))
    return pairs


def _channel_ranges(model: Any, tensors: list[str], samples: np.ndarray, threads: int) -> dict[str, np.ndarray]:
    """``{tensor: (C,)}``: the largest absolute value per channel (axis 1) of each tensor over ``samples``."""
    ranges: dict[str, np.ndarray] = {}
    for values in intermediate_values(model, tensors, samples, threads, BATCH):
        for name, value in values.items():
            axes = tuple(a for a in range(value.ndim) if a != 1)
            peak = np.abs(value).max(axis=axes).astype(np.float64)
            ranges[name] = np.maximum(ranges[name], peak) if name in ranges else peak
    return ranges


def _live(peak: np.ndarray) -> np.ndarray:
    """The channels that carry anything (a dead channel's range is not raised to the others')."""
    return peak > 1e-6 * peak.max()


def _scales(peak: np.ndarray, live: np.ndarray) -> np.ndarray:
    """``s_i`` that brings channel ``i``'s range ``peak_i`` to the mean range of the ``live`` channels."""
    scales = np.ones_like(peak)
    scales[live] = peak[live].mean() / peak[live]
    return np.clip(scales, 1 / MAX_SCALE, MAX_SCALE)


def _size(initializer: Any) -> int:
    return int(np.prod(initializer.dims)) if initializer.dims else 1


def _rescale(initializers: dict[str, Any], name: str, scale: np.ndarray, axis: int) -> None:
    """Multiply initializer ``name`` by ``scale`` along ``axis``, in place."""
    from onnx import numpy_helper

    value = numpy_helper.to_array(initializers[name])
    shape = [1] * value.ndim
    shape[axis] = -1
    scaled = (value.astype(np.float64) * scale.reshape(shape)).astype(value.dtype)
    initializers[name].CopyFrom(numpy_helper.from_array(scaled, name))


def equalize(fp32: Path, out: Path, samples: torch.Tensor, threads: int = 1,
             should_cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Write ``out``: ``fp32`` (an ONNX model, e.g. ``kegnet.compression.quantize.prepare``'s output) with the
    channels between every exactly equalizable linear pair brought to one range on ``samples``
    ``(N, *input_shape)``; the fp32 function is unchanged up to rounding. Returns ``{"pairs", "spread_before",
    "spread_after"}``: pairs equalized and the largest ratio of a live channel's range to the quietest one's in
    any equalized tensor, before and after (as measured on ``samples``)."""
    import onnx

    model = onnx.load(str(fp32))
    pairs = _pairs(model)
    if not pairs:
        onnx.save(model, str(out))
        return {"pairs": 0, "spread_before": 1.0, "spread_after": 1.0}
    if should_cancel is not None and should_cancel():
        raise Cancelled("cancelled while equalizing the int8 model's ranges")
    x = samples.detach().float().cpu().numpy()
    peaks = _channel_ranges(model, [p.between for p in pairs], x, threads)
    initializers = {i.name: i for i in model.graph.initializer}
    spreads, done_pairs = [], 0
    for pair in pairs:
        peak = peaks[pair.between]
        live = _live(peak)
        bias = pair.first.input[2] if len(pair.first.input) > 2 and pair.first.input[2] else None
        if not live.any() or (bias is not None and _size(initializers[bias]) != len(peak)):
            continue  # a silent tensor, or a broadcast bias that cannot be scaled per channel
        scale = _scales(peak, live)
        spreads.append((peak[live].max() / peak[live].min(), (peak * scale)[live].max() / (peak * scale)[live].min()))
        done_pairs += 1
        first_axis = 0 if pair.first.op_type == "Conv" or attribute(pair.first, "transB", 0) else 1
        _rescale(initializers, pair.first.input[1], scale, first_axis)
        if bias is not None:
            _rescale(initializers, bias, scale, 0)
        second_axis = 1 if pair.second.op_type == "Conv" or attribute(pair.second, "transB", 0) else 0
        _rescale(initializers, pair.second.input[1], 1 / scale, second_axis)
    onnx.save(model, str(out))
    done = {"pairs": done_pairs, "spread_before": float(max((s[0] for s in spreads), default=1.0)),
            "spread_after": float(max((s[1] for s in spreads), default=1.0))}
    log.info("range equalization: %d pairs, largest channel-range spread %.3g -> %.3g", done["pairs"],
             done["spread_before"], done["spread_after"])
    return done


__all__ = ["equalize"]
