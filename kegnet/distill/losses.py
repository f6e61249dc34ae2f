"""Distillation objectives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. (2015): KL(teacher_T || student_T) · T², so gradients keep their scale as T changes.

    Shapes: ``(N, K), (N, K) -> scalar`` (batch mean).
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * t * t


def kd_step(student: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """One optimizer step of ``student`` on ``kd_loss`` against ``teacher_logits`` for the batch ``x``; the loss
    (detached)."""
    loss = kd_loss(student(x), teacher_logits, temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()
