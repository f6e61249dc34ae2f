"""Matching the outputs of the factorized layers, not only the logits (hints, Romero et al. 2015, FitNets).

A Tucker student has the teacher's layout: every factorized layer replaces one teacher layer with an output
of the same shape. Matching those outputs gives the student far more signal per synthetic sample (e.g. 120
values per sample at LeNet-5's conv3, against 10 logits) about the function the teacher computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kegnet.models.taps import FeatureTap

__all__ = ["FeatureTap", "feature_loss"]  # FeatureTap lives in kegnet.models.taps; re-exported here


def feature_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over layers of ``MSE(s, t) / mean(t²)``: scale-free, so wide and narrow layers weigh alike.

    Shapes: per layer ``(N, ...)`` and ``(N, ...)`` of equal shape -> scalar.
    """
    losses = [F.mse_loss(student[name], t) / t.square().mean().clamp_min(1e-8) for name, t in teacher.items()]
    return torch.stack(losses).mean()
