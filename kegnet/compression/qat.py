"""Fine-tuning through fake quantization on the job's synthetic samples, before onnxruntime's INT8.

Post-training rounding of a small network's weights and activations costs points that no calibration method
recovers (docs/benchmarks.md, issue 22: the activations' ranges and the weights' rounding, about a point each on
MobileNetV3-small). Here a copy of the fp32 student is trained for a few hundred steps by distillation from the
teacher on the job's own synthetic samples while every ``Conv2d`` and ``Linear`` computes on rounded values: its
input rounded to uint8 over fixed ranges (the calibration samples' minimum and maximum, as onnxruntime's MinMax
calibrator sets them) and its weight rounded to onnxruntime's symmetric per-output-channel int8 grid (7-bit with
``reduce_range``), the gradient passing straight through the rounding. This is quantization-aware training on
generator samples, as GDFQ (Xu et al. 2020, "Generative low-bitwidth data free quantization") trains its
quantized net. The copy learns weights whose rounding costs less; onnxruntime then quantizes the copy with its
own calibration as before (kegnet.compression.quantize), so nothing of this module reaches the int8 file but
the weights.

BatchNorm stays in eval mode: its running statistics are the real data's, and onnxruntime folds it into the conv
before quantizing; per-channel rounding of a folded weight is the per-channel rounding of the unfolded one,
scaled, so rounding the unfolded weight here rounds what onnxruntime will.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import nn

from kegnet.distill.losses import kd_step
from kegnet.errors import Cancelled
from kegnet.generation import Sampler

log = logging.getLogger(__name__)

ACTIVATION_LEVELS = 255  # uint8, onnxruntime's activation type here


def round_weight(w: torch.Tensor, reduce_range: bool) -> torch.Tensor:
    """``w`` rounded to onnxruntime's symmetric per-output-channel int8 grid (scale: the channel's largest
    magnitude over 64 with ``reduce_range``, else over 127), straight-through: the value is rounded, the
    gradient is the identity's. Shape kept: ``(out, ...)``."""
    q_max = 64 if reduce_range else 127
    scale = w.detach().abs().amax(dim=tuple(range(1, w.dim())), keepdim=True).clamp_min(1e-12) / q_max
    rounded = torch.clamp(torch.round(w / scale), -q_max, q_max) * scale
    return w + (rounded - w).detach()


def round_activation(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``x`` clipped to ``[min(low, 0), max(high, 0)]`` and rounded to uint8's 256 levels with an exact zero
    (onnxruntime's asymmetric activations); straight-through inside the range, no gradient outside it."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max(high - low, 1e-12) / ACTIVATION_LEVELS
    zero = round(-low / scale)
    clipped = torch.clamp(x, low, high)
    rounded = (torch.clamp(torch.round(x / scale) + zero, 0, ACTIVATION_LEVELS) - zero) * scale
    return clipped + (rounded - clipped).detach()


class _Rounded(nn.Module):
    """A ``Conv2d`` or ``Linear`` whose input and weight are rounded as onnxruntime's int8 model rounds them.
    Until ``ranges_fixed``, it records its input's range and computes exactly (the calibration pass)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, reduce_range: bool) -> None:
        super().__init__()
        self.layer, self.reduce_range = layer, reduce_range
        self.low, self.high, self.ranges_fixed = float("inf"), float("-inf"), False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ranges_fixed:
            self.low, self.high = min(self.low, float(x.min())), max(self.high, float(x.max()))
            return self.layer(x)
        x = round_activation(x, self.low, self.high)
        w = round_weight(self.layer.weight, self.reduce_range)
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, self.layer.bias)
        return nn.functional.linear(x, w, self.layer.bias)


def _swap(model: nn.Module, reduce_range: bool) -> list[_Rounded]:
    """Every ``Conv2d``/``Linear`` of ``model`` wrapped in ``_Rounded``, in place."""
    wrapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d | nn.Linear):
                wrapped.append(_Rounded(child, reduce_range))
                setattr(parent, name, wrapped[-1])
    return wrapped


def _unswap(model: nn.Module) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _Rounded):
                setattr(parent, name, child.layer)


def finetune_quantized(student: nn.Module, teacher: nn.Module, sampler: Sampler, calibration: torch.Tensor, *,
                       steps: int, lr: float = 1e-4, batch_size: int = 128, temperature: float = 3.0,
                       reduce_range: bool = True, device: torch.device, seed: int,
                       should_cancel: Callable[[], bool] | None = None) -> nn.Module:
    """A copy of ``student`` distilled from ``teacher`` for ``steps`` Adam steps on ``sampler``'s batches while
    its ``Conv2d``/``Linear`` layers compute on int8-rounded inputs and weights (the module says how); the
    ``student`` itself is left as it is. ``calibration``: ``(M, *input)`` samples that fix each layer's input
    range (the ones onnxruntime will calibrate on). The copy is in eval mode, with plain layers again."""
    tuned = copy.deepcopy(student).to(device).eval()  # eval throughout: BatchNorm frozen, dropout off
    layers = _swap(tuned, reduce_range)
    with torch.no_grad():
        for batch in calibration.to(device).split(64):
            tuned(batch)
    for layer in layers:
        layer.ranges_fixed = True
    optimizer = torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=lr)
    rng = torch.Generator(device=device).manual_seed(seed)
    for step in range(1, steps + 1):
        x, _ = sampler.sample(batch_size, rng)
        with torch.no_grad():
            target = teacher(x)
        loss = kd_step(tuned, optimizer, x, target, temperature)
        if should_cancel and should_cancel():
            raise Cancelled("cancelled while fine-tuning the int8 model")
        if step % 100 == 0:
            log.info("fake-quantized fine-tuning: step %d/%d, loss %.4f", step, steps, loss.item())
    _unswap(tuned)
    return tuned.eval()


__all__ = ["finetune_quantized", "round_activation", "round_weight"]
