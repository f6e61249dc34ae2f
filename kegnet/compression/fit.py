"""Fitting factorized layers to what the teacher's layers compute (``compression.fit = "outputs"``).

A weight fit (HOSVD, truncated SVD) makes each factorized layer close to the teacher's *weights*; on inputs
the layer actually sees, most of that closeness can be wasted on directions no input takes. Here each
factorized layer is refit, in forward order, to reproduce the teacher layer's outputs on synthetic inputs:
its inputs are the *student's* own (every earlier layer already refit), so each layer also corrects the error
the layers before it left (asymmetric reconstruction, Zhang et al. 2015, "Accelerating very deep
convolutional networks for classification and detection").

Each fit is closed form: with features ``F`` (inputs unfolded to rows) and targets ``Y`` (the teacher layer's
outputs less its bias), the rank-``r`` map nearest both to the samples and to the teacher's own map
(``_anchored_fit``: ridge toward the teacher, then an activation-aware truncated SVD). What each kind fits:

- ``LowRankLinear`` / ``LowRankConv1x1``: both factors (``F`` = the layer's input channels).
- ``Tucker2Conv2d``: the k×k core and the last 1×1 (``F`` = patches of the first 1×1's output, which keeps
  its weight fit).

Grouped layers and non-zero padding modes keep their weight fit (listed as skipped).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.linalg import solve_triangular
from torch import nn

from kegnet.compression.layers import LowRankConv1x1, LowRankLinear, Tucker2Conv2d
from kegnet.compression.plan import CompressionPlan, blas_threads
from kegnet.errors import Cancelled

log = logging.getLogger(__name__)

# How strongly the fit holds on to the teacher's own map, relative to the mean feature energy (the weight of
# ``||W - W_teacher||²`` against the squared error on the samples). Toward zero (issue 21's prototype: a
# ridge toward zero at 1e-2) the fit keeps only what the synthetic samples excite: on UCI letter the start
# rose 16 points but the fine-tuned student lost 4.5.
ANCHOR = 1.0


class _Stop(Exception):
    """Raised by a hook once the layer of interest has run: the rest of the forward pass is not needed."""


def fit_to_outputs(teacher: nn.Module, student: nn.Module, plan: CompressionPlan, inputs: torch.Tensor, *,
                   batch_size: int = 128, anchor: float = ANCHOR,
                   should_cancel: Callable[[], bool] | None = None) -> dict[str, dict[str, float | str]]:
    """Refit ``student``'s factorized layers (in place, forward order) to ``teacher``'s layer outputs on
    ``inputs`` (``(N, *input_shape)``, on the models' device). Returns per layer the relative output error
    ``||Y - Ŷ||² / ||Y||²`` on ``inputs`` of the weight fit (``before``) and of the refit (``after``), or why
    it was skipped."""
    teacher.eval()
    student.eval()
    errors: dict[str, dict[str, float | str]] = {}
    for p in plan.layers:
        if should_cancel is not None and should_cancel():
            raise Cancelled("cancelled while fitting the factorized layers")
        layer = student.get_submodule(p.name)
        why = _unsupported(layer)
        if why:
            errors[p.name] = {"skipped": why}
            continue
        with torch.no_grad(), blas_threads():
            errors[p.name] = _fit_layer(teacher.get_submodule(p.name), layer, teacher, student, inputs, batch_size,
                                        anchor)
        log.debug("fit %s to outputs: relative error %.4f -> %.4f", p.name, errors[p.name]["before"],
                  errors[p.name]["after"])
    return errors


def _unsupported(layer: nn.Module) -> str | None:
    if isinstance(layer, Tucker2Conv2d | LowRankConv1x1):
        conv = layer.core if isinstance(layer, Tucker2Conv2d) else layer.first
        if conv.groups > 1:
            return "grouped convolution: keeps its weight fit"
        if conv.padding_mode != "zeros":
            return f"padding mode {conv.padding_mode}: keeps its weight fit"
        return None
    return None if isinstance(layer, LowRankLinear) else f"{type(layer).__name__} is not a factorized layer"


def _capture(model: nn.Module, module: nn.Module, x: torch.Tensor, want: str) -> torch.Tensor:
    """``module``'s input (``want="input"``) or output when ``model`` runs on ``x``; the forward pass stops there."""
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen.append(args[0] if want == "input" else out)
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0]


def _features(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows the fitted map reads: ``(rows, d)``."""
    if isinstance(layer, LowRankLinear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(layer, Tucker2Conv2d):
        x, conv = layer.first(x), layer.core
    else:
        conv = layer.first
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (N·L, C·kh·kw), C slowest as in the weight


def _targets(y: torch.Tensor, bias: torch.Tensor | None, linear: bool) -> torch.Tensor:
    rows = y.reshape(-1, y.shape[-1]) if linear else y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    return rows - bias if bias is not None else rows


def _fit_layer(original: nn.Module, layer: nn.Module, teacher: nn.Module, student: nn.Module,
               inputs: torch.Tensor, batch_size: int, anchor: float) -> dict[str, float | str]:
    linear = isinstance(layer, LowRankLinear)
    bias = layer.last.bias
    gram = cross = None
    energy = residual = 0.0
    for start in range(0, len(inputs), batch_size):
        x = inputs[start:start + batch_size]
        y = _targets(_capture(teacher, original, x, "output"), bias, linear)
        own = _capture(student, layer, x, "input")
        residual += float(((_targets(layer(own), bias, linear) - y).double() ** 2).sum())
        # The sums in numpy float64 (its BLAS, threads limited by the caller): torch's CPU BLAS gave results
        # that differed in the last bits from one run to the next, and a job must repeat itself exactly.
        f, y = _numpy(_features(layer, own)), _numpy(y)
        gram = f.T @ f if gram is None else gram + f.T @ f
        cross = f.T @ y if cross is None else cross + f.T @ y
        energy += float((y**2).sum())
    assert gram is not None and cross is not None
    first, last = _anchored_fit(gram, cross, _teacher_map(original, layer), layer.last.weight.shape[1], anchor)
    w = first @ last.T  # (d, C_out): the fitted map
    after = energy - 2 * float((w * cross).sum()) + float((w * (gram @ w)).sum())
    _set(layer, first, last)
    return {"before": residual / max(energy, 1e-30), "after": max(after, 0.0) / max(energy, 1e-30)}


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _teacher_map(original: nn.Module, layer: nn.Module) -> np.ndarray:
    """The teacher layer's map on the fitted features, ``(d, C_out)``: its weight, or for Tucker-2 its weight
    read through the first 1×1 (orthonormal rows ``U``: an input ``x`` is ``Uᵀz`` in the features ``z``)."""
    w = _numpy(original.weight)
    if isinstance(layer, Tucker2Conv2d):
        u = _numpy(layer.first.weight)[:, :, 0, 0]  # (R_in, C_in)
        w = np.einsum("oikl,ri->orkl", w, u)
    return w.reshape(w.shape[0], -1).T


def _anchored_fit(gram: np.ndarray, cross: np.ndarray, prior: np.ndarray, rank: int, anchor: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The rank-``rank`` map ``first @ last.T`` (``first (d, r)``, ``last (C_out, r)``) minimizing
    ``||Y - F W||² + λ||W - prior||²``, with ``λ = anchor · trace(FᵀF) / d``.

    The full-rank minimizer is ``W = (FᵀF + λI)⁻¹(FᵀY + λ·prior)``, and the same objective measures the rank-r
    error in the metric ``M = FᵀF + λI``: truncating the SVD of ``M^½ W`` and mapping back is optimal (an
    activation-aware SVD). ``anchor → ∞`` gives the weight fit's truncated SVD, ``anchor → 0`` a pure fit to
    the synthetic samples, which discards whatever they do not excite (and real inputs may)."""
    d = gram.shape[0]
    lam = anchor * float(np.trace(gram)) / d + 1e-12
    metric = gram + lam * np.eye(d)
    w = np.linalg.solve(metric, cross + lam * prior)
    root = np.linalg.cholesky(metric).T  # metric = rootᵀ root, root upper triangular
    u, s, qh = np.linalg.svd(root @ w, full_matrices=False)
    k = min(rank, len(s))  # a rank above min(d, C_out) (ResNet-18's [10, 512] Tucker-2: d = 90) adds nothing
    scale = np.sqrt(s[:k])  # the singular values split evenly between the two factors, as the weight fit does
    first = solve_triangular(root, u[:, :k] * scale, lower=False)
    last = qh[:k].T * scale
    # The components past k are zero: the map has no more, and the layer keeps its shape.
    return np.pad(first, ((0, 0), (0, rank - k))), np.pad(last, ((0, 0), (0, rank - k)))


def _set(layer: nn.Module, first: np.ndarray, last: np.ndarray) -> None:
    """Write the fitted factors: ``first`` (d, r) into the layer's input side, ``last`` (C_out, r) into its 1×1."""
    head = layer.core if isinstance(layer, Tucker2Conv2d) else layer.first
    w = head.weight
    head.weight.copy_(torch.from_numpy(np.ascontiguousarray(first.T)).reshape(w.shape).to(w.dtype))
    layer.last.weight.copy_(torch.from_numpy(np.ascontiguousarray(last)).reshape(layer.last.weight.shape).to(w.dtype))
