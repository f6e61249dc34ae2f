"""Adaptive rounding of an INT8 (QDQ) ONNX model's weights on synthetic samples (AdaRound: Nagel et al. 2020,
"Up or down? Adaptive rounding for post-training quantization").

onnxruntime rounds every weight to its nearest step. Nearest is best for each weight alone, not for what the
layer computes: the rounding errors of one output channel add up over its inputs. AdaRound chooses, weight by
weight, to round up or down so that the layer's output on real inputs moves least. Here the inputs are the job's
calibration samples (never data), run through the fp32 model to each layer.

For each Conv (2-D) or Gemm whose weights are an int8 initializer behind a DequantizeLinear (per channel, scale
``s``): with ``w = W / s`` (``W`` the fp32 weights the quantizer rounded), the int8 weights become
``floor(w) + h`` with ``h`` in {0, 1} learnt from a soft ``h(V)`` (the rectified sigmoid) by Adam on
``|layer(X; s * (floor(w) + h(V))) - layer(X; W)|^2`` plus a term that pushes ``h(V)`` to 0 or 1 (its exponent
annealed from 20 to 2). Only the int8 initializers change: scales, zero points, biases and the graph stay as
onnxruntime wrote them, so the file runs wherever the nearest-rounded one runs. Each weight moves by at most one
step from where nearest rounding put it, so the 7-bit range (``reduce_range``) is kept.

Both models are read by node name, as in kegnet.compression.bias_correction: the fp32 model is the one the int8
model was quantized from. Shapes: Conv weights ``(C_out, C_in/g, kH, kW)``, inputs ``(N, C_in, H, W)``; Gemm
weights ``(out, in)`` with ``transB=1``, ``(in, out)`` otherwise, inputs ``(N, in)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kegnet.compression.onnx_session import attribute, intermediate_values
from kegnet.errors import Cancelled

log = logging.getLogger(__name__)

# AdaRound's published settings (rectified sigmoid stretch, regularizer weight, exponent schedule, warm-up
# without the regularizer); fewer iterations than its 10,000-20,000, with a higher rate to match.
ZETA, GAMMA = 1.1, -0.1
REG_WEIGHT = 0.01
BETA = (20.0, 2.0)
WARMUP = 0.2
ITERATIONS = 1000
LEARNING_RATE = 1e-2
BATCH = 32  # samples per Adam step, fewer where one sample costs more than STEP_MACS
STEP_MACS = 2**25  # bounds one step's multiply-adds: a 224x224 teacher's early layers get one sample a step
LAYERS_PER_PASS = 8  # layers whose inputs are read in one pass over the samples
PASS_BYTES = 2**29  # bounds the inputs and outputs held at once: fewer samples where they would not fit
RUN_BATCH = 64


@dataclass
class _Layer:
    node: Any  # the int8 model's Conv/Gemm NodeProto
    quantized: str  # its int8 weight initializer
    scale: str  # the weights' scale initializer
    axis: int  # the scale's axis in the weights
    weight: str  # the fp32 model's weight initializer
    input: str  # the fp32 model's name of the layer's input tensor


def _layers(model: Any, reference: Any) -> tuple[list[_Layer], int]:
    """The Conv (2-D, explicit padding) and Gemm nodes of ``model`` (an int8 QDQ ModelProto) with int8 weights
    behind a DequantizeLinear and a node of the same name in ``reference`` (its fp32 ModelProto) whose weights are
    an initializer, in graph order; and how many Conv/Gemm nodes are left out."""
    from onnx import TensorProto

    initializers = {i.name: i for i in model.graph.initializer}
    reference_initializers = {i.name for i in reference.graph.initializer}
    reference_nodes = {n.name: n for n in reference.graph.node if n.name}
    dequantized = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    layers, left = [], 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        dq = dequantized.get(node.input[1])
        fp32 = reference_nodes.get(node.name)
        ok = (dq is not None and dq.input[0] in initializers and dq.input[1] in initializers
              and initializers[dq.input[0]].data_type == TensorProto.INT8 and fp32 is not None
              and fp32.input[1] in reference_initializers)
        if ok and node.op_type == "Conv":
            ok = len(initializers[dq.input[0]].dims) == 4 and attribute(node, "auto_pad", b"NOTSET") in (
                b"NOTSET", "NOTSET")
        if not ok:
            left += 1
            continue
        layers.append(_Layer(node, dq.input[0], dq.input[1], attribute(dq, "axis", 1), fp32.input[1],
                             fp32.input[0]))
    return layers, left


def _forward(node: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The layer's output on ``x`` with weights ``w``, bias left out (it is the same in both models)."""
    if node.op_type == "Gemm":
        if attribute(node, "transA", 0):
            x = x.t()
        return x @ (w.t() if attribute(node, "transB", 0) else w)
    top, left, bottom, right = attribute(node, "pads", [0, 0, 0, 0])
    if (top, left) != (bottom, right):
        x = F.pad(x, (left, right, top, bottom))
        top = left = 0
    return F.conv2d(x, w, stride=tuple(attribute(node, "strides", [1, 1])), padding=(top, left),
                    dilation=tuple(attribute(node, "dilations", [1, 1])), groups=attribute(node, "group", 1))


def _values(model: Any, names: list[str], x: np.ndarray, threads: int) -> dict[str, torch.Tensor]:
    """``{name: (N, ...)}``: the named tensors of ``model`` (a ModelProto) on all of ``x``."""
    values = list(intermediate_values(model, names, x, threads, RUN_BATCH))
    return {name: torch.from_numpy(np.concatenate([v[name] for v in values])) for name in names}


def _soft(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _round_layer(node: Any, x: torch.Tensor, target: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                 generator: torch.Generator, iterations: int) -> tuple[torch.Tensor, float, float]:
    """The int8 weights of one layer by adaptive rounding, so that its output on ``x`` comes close to ``target``;
    and the output error (mean square, relative to the target's) with nearest rounding and with the learnt
    one."""
    steps = w / scale
    floor = torch.floor(steps)
    rest = (steps - floor).clamp(1e-4, 1 - 1e-4)
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_()
    optimizer = torch.optim.Adam([v], lr=LEARNING_RATE)
    power = target.pow(2).mean().clamp_min(1e-12)
    macs = target[0].numel() * w.numel() // target.shape[1]  # per sample
    size = max(1, min(BATCH, len(x), STEP_MACS // max(macs, 1)))
    for i in range(iterations):
        batch = torch.randint(len(x), (size,), generator=generator)
        h = _soft(v)
        out = _forward(node, x[batch], scale * (floor + h))
        loss = (out - target[batch]).pow(2).mean() / power
        progress = (i / iterations - WARMUP) / (1 - WARMUP)
        if progress > 0:  # after the warm-up, push h to 0 or 1 ever harder (the exponent falls)
            beta = BETA[1] + 0.5 * (BETA[0] - BETA[1]) * (1 + np.cos(np.pi * progress))
            loss = loss + REG_WEIGHT * (1 - (2 * h - 1).abs().pow(beta)).sum() / v.numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        learnt = floor + (_soft(v) >= 0.5).to(floor.dtype)
        errors = [float((_forward(node, x, scale * q) - target).pow(2).mean() / power)
                  for q in (torch.round(steps), learnt)]
    return learnt, errors[0], errors[1]


def adaround(fp32: Path, int8: Path, out: Path, samples: torch.Tensor, *, iterations: int = ITERATIONS,
             inputs: str = "fp32", threads: int = 1, seed: int = 0,
             should_cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Write ``out``: ``int8`` (a QDQ model quantized from ``fp32``) with each Conv/Gemm's int8 weights rounded up
    or down so that the layer's output on ``samples`` ``(N, *input_shape)`` comes closest to the fp32 layer's on
    its fp32 input. ``inputs``: the int8 layer sees the fp32 model's input ("fp32"), or the int8 model's as
    rounded so far ("int8": each layer then also makes up for the activations' rounding and the layers before
    it, AdaRound's asymmetric reconstruction; one pass of the int8 model per layer).
    Returns ``{"layers", "skipped", "samples", "error_nearest", "error_adaround"}``: layers rounded, Conv/Gemm
    nodes left as they are, the fewest samples a layer was rounded on (``PASS_BYTES``), and the mean over layers
    of the output's relative square error with each rounding."""
    import onnx
    from onnx import numpy_helper

    torch.set_num_threads(threads)
    x = samples.detach().float().cpu().numpy()
    reference, model = onnx.load(str(fp32)), onnx.load(str(int8))
    layers, skipped = _layers(model, reference)
    initializers = {i.name: i for i in model.graph.initializer}
    reference_weights = {i.name: i for i in reference.graph.initializer}
    generator = torch.Generator().manual_seed(seed)
    errors: list[tuple[float, float]] = []
    fewest = len(x)
    for first in range(0, len(layers), LAYERS_PER_PASS):
        group = layers[first:first + LAYERS_PER_PASS]
        names = sorted({layer.input for layer in group})
        per_sample = sum(v.numel() * 4 for v in _values(reference, names, x[:1], threads).values())
        # x2: each layer's output on the samples is held beside its input (about as large, or smaller)
        n = max(1, min(len(x), PASS_BYTES // (2 * per_sample)))
        fewest = min(fewest, n)
        fp32_inputs = _values(reference, names, x[:n], threads)
        for layer in group:
            if should_cancel is not None and should_cancel():
                raise Cancelled("cancelled while rounding the int8 model's weights")
            w = torch.from_numpy(numpy_helper.to_array(reference_weights[layer.weight]).astype(np.float32))
            scale = torch.from_numpy(numpy_helper.to_array(initializers[layer.scale]).astype(np.float32))
            shape = [1] * w.dim()
            shape[layer.axis] = -1
            scale = scale.reshape(shape)
            nearest = numpy_helper.to_array(initializers[layer.quantized])
            if not np.array_equal(np.rint(w.numpy() / scale.numpy()), nearest.astype(np.float32)):
                # Not the weights this int8 tensor was rounded from (another model's, or clipped): leave it.
                skipped += 1
                continue
            x_fp32 = fp32_inputs[layer.input]
            with torch.no_grad():
                target = _forward(layer.node, x_fp32, w)
            seen = x_fp32 if inputs == "fp32" else _values(model, [layer.node.input[0]], x[:n], threads)[
                layer.node.input[0]]
            learnt, before, after = _round_layer(layer.node, seen, target, w, scale, generator, iterations)
            if after < before:
                initializers[layer.quantized].CopyFrom(
                    numpy_helper.from_array(learnt.numpy().astype(np.int8), layer.quantized))
            errors.append((before, min(before, after)))
        del fp32_inputs
    onnx.save(model, str(out))
    done = {"layers": len(errors), "skipped": skipped, "samples": fewest,
            "error_nearest": float(np.mean([e[0] for e in errors])) if errors else 0.0,
            "error_adaround": float(np.mean([e[1] for e in errors])) if errors else 0.0}
    log.info("adaptive rounding: %d layers, %d left, output error %.3g -> %.3g", done["layers"], skipped,
             done["error_nearest"], done["error_adaround"])
    return done


__all__ = ["adaround"]
