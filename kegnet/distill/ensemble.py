"""Several teachers as one: a per-sample, uncertainty-weighted mixture of their soft outputs.

``TeacherEnsemble(teachers, weighting=...)`` is an ``nn.Module`` whose ``forward(x)`` returns logits of the
mixture, so it goes wherever a teacher goes (generator training, distillation, agreement, the adversary).
With temperature T and per-sample weights w_i(x) (summing to 1 over the teachers):

    p_mix(x) = sum_i w_i(x) softmax(z_i(x) / T)        forward(x) = T log p_mix(x)

so that ``softmax(forward(x) / T)`` is exactly the mixture of the teachers' soft outputs at T (what
``kd_loss`` at T matches), and ``argmax`` is the mixture's class. With one teacher it equals that teacher's
softmax at every temperature (its logits up to a per-sample constant).

Weights (``weighting``), uncertainty u_i(x) normalized to [0, 1] and tau the ``ensemble_temperature``:

- ``mean``: w_i = 1/M, the plain-averaging baseline;
- ``entropy``: u_i = H(softmax(z_i)) / log K, w = softmax_i(-u_i / tau): a teacher sure of a sample speaks
  for it (teachers of different domains are each sure on their own domain);
- ``mc_dropout``: u_i = sum over classes of the variance of softmax(z_i) over ``mc_passes`` passes with
  dropout on (BatchNorm stays in eval), divided by its bound 1 - 1/K; same softmax. Only when every
  teacher has dropout: otherwise all fall back to entropy (logged), because a variance and an entropy are
  on different scales and mixing them would favour one kind of teacher, not the surer one.

Weights are detached: they choose whom to follow, they are not something to optimize. The dropout masks
of ``mc_dropout`` come from torch's global generator (dropout takes no ``torch.Generator``), which the
pipeline seeds.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kegnet.config import MAX_TEACHERS
from kegnet.metrics import agreement

log = logging.getLogger(__name__)

Weighting = Literal["mean", "entropy", "mc_dropout"]


def has_dropout(model: nn.Module) -> bool:
    """Whether ``model`` has a dropout layer with p > 0 (so MC dropout can measure its uncertainty)."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


@contextlib.contextmanager
def dropout_active(model: nn.Module) -> Iterator[None]:
    """Dropout layers in training mode (everything else as it was) inside the block; restored after."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    modes = [m.training for m in layers]
    try:
        for m in layers:
            m.train(True)
        yield
    finally:
        for m, mode in zip(layers, modes, strict=True):
            m.train(mode)


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last axis divided by log K: ``(..., K) -> (...)``, in [0, 1]."""
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1) / math.log(logits.shape[-1])


@torch.no_grad()
def mc_dropout_uncertainty(model: nn.Module, x: torch.Tensor, passes: int) -> torch.Tensor:
    """Summed class-probability variance over ``passes`` dropout passes, over its bound 1 - 1/K.

    Shapes: ``(N, ...) -> (N,)``, in [0, 1].
    """
    with dropout_active(model):
        probs = torch.stack([F.softmax(model(x), dim=-1) for _ in range(passes)])  # (P, N, K)
    k = probs.shape[-1]
    return probs.var(0, unbiased=False).sum(-1) / (1 - 1 / k)


def uncertainty_weights(uncertainty: torch.Tensor, tau: float) -> torch.Tensor:
    """``softmax(-u / tau)`` over the teachers: ``(M, N) -> (M, N)``, columns sum to 1."""
    return F.softmax(-uncertainty / tau, dim=0)


def mix_soft_outputs(logits: torch.Tensor, weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T log sum_i w_i softmax(z_i / T)``: logits whose softmax at T is the weighted mixture.

    Shapes: ``(M, N, K)`` logits, ``(M, N)`` weights -> ``(N, K)``.
    """
    t = temperature
    log_p = F.log_softmax(logits / t, dim=-1)
    return torch.logsumexp(log_p + weights.clamp_min(1e-12).log()[..., None], dim=0) * t


class TeacherEnsemble(nn.Module):
    """Teachers of one architecture and label set, combined per sample (see the module docstring).

    ``temperature``: the T at which soft outputs are mixed (the distillation temperature; 1 for generator
    training). ``base``: the member the student was compressed from; hints and penultimate-feature
    relations use its features. ``last_weights`` holds the ``(M, N)`` weights of the last forward pass.
    """

    def __init__(self, teachers: Sequence[nn.Module], *, weighting: Weighting = "mean", temperature: float = 1.0,
                 tau: float = 0.1, mc_passes: int = 8, base: int = 0) -> None:
        super().__init__()
        if not 1 <= len(teachers) <= MAX_TEACHERS:
            raise ValueError(f"an ensemble takes 1 to {MAX_TEACHERS} teachers, got {len(teachers)}")
        if not 0 <= base < len(teachers):
            raise ValueError(f"base {base} is not a member index")
        if weighting not in ("mean", "entropy", "mc_dropout"):
            raise ValueError(f"unknown weighting {weighting!r}")
        self.members = nn.ModuleList(teachers)
        self.temperature, self.tau, self.mc_passes, self.base = temperature, tau, mc_passes, base
        self.weighting: Weighting = weighting
        if weighting == "mc_dropout":
            without = [i for i, t in enumerate(teachers) if not has_dropout(t)]
            if without:
                log.warning("mc_dropout weighting needs dropout in every teacher; teacher(s) %s have none: "
                            "weighting by entropy instead", ", ".join(str(i) for i in without))
                self.weighting = "entropy"
        self.last_weights: torch.Tensor | None = None

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every teacher's logits: ``(N, ...) -> (M, N, K)``."""
        return torch.stack([m(x) for m in self.members])

    def member_weights(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Per-sample weights ``(M, N)`` (detached) for ``x`` and its member logits ``(M, N, K)``."""
        m, n = logits.shape[:2]
        if self.weighting == "mean" or m == 1:
            return torch.full((m, n), 1.0 / m, device=logits.device, dtype=logits.dtype)
        if self.weighting == "entropy":
            u = normalized_entropy(logits.detach())
        else:
            u = torch.stack([mc_dropout_uncertainty(t, x, self.mc_passes) for t in self.members])
        return uncertainty_weights(u, self.tau).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the weighted mixture: ``(N, ...) -> (N, K)``."""
        logits = self.member_logits(x)
        weights = self.member_weights(x, logits)
        self.last_weights = weights
        return mix_soft_outputs(logits, weights, self.temperature)


def feature_source(teacher: nn.Module) -> nn.Module:
    """The model whose intermediate features stand for ``teacher``: an ensemble's base member, or itself."""
    return teacher.members[teacher.base] if isinstance(teacher, TeacherEnsemble) else teacher


@torch.no_grad()
def member_agreements(ensemble: TeacherEnsemble, x: torch.Tensor) -> list[float]:
    """Each member's agreement (same predicted class) with the ensemble's mixture on ``x``."""
    return [agreement(ensemble, member, x) for member in ensemble.members]


__all__ = [
    "TeacherEnsemble", "dropout_active", "feature_source", "has_dropout", "mc_dropout_uncertainty",
    "member_agreements", "mix_soft_outputs", "normalized_entropy", "uncertainty_weights",
]
