"""Distillation objectives for autoregressive students (Kim & Rush 2016, "Sequence-Level Knowledge Distillation").

Model contract: ``model(tokens (B, T)) -> logits (B, T, V)``, causal; position ``t`` predicts token ``t + 1``.
A batch of right-padded sequences ``(B, L)`` is split by :func:`shift` into inputs ``seq[:, :-1]`` and targets
``seq[:, 1:]`` (both ``(B, L - 1)``); :func:`target_mask` says which of those predictions are trained on.

- ``"word"``: word-level KD, KL(teacher_T || student_T) · T² at every selected position of teacher-generated
  sequences (the transfer set of sampled generations).
- ``"sequence"``: sequence-level KD, the student's token cross-entropy on the teacher's beam-search outputs.
- ``"both"``: ``word_weight · word + (1 - word_weight) · sequence``, both terms on the *same* beam sequences
  (Kim & Rush's "Word+Seq-KD": the teacher's soft distribution along its own beam output), so one student
  forward pass serves both terms.

Every loss is a mean over the selected positions of the whole batch (a token-level mean: long sequences weigh
more, as in Kim & Rush's summed NLL), and is a graph-connected zero when no position is selected.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Objective = Literal["word", "sequence", "both"]
OBJECTIVES: tuple[str, ...] = ("word", "sequence", "both")


def shift(sequences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of a batch of sequences.

    Shapes: ``(B, L) -> (B, L - 1), (B, L - 1)``.
    """
    return sequences[:, :-1], sequences[:, 1:]


def target_mask(sequences: torch.Tensor, *, pad_id: int | None, eos_id: int | None,
                prefix_len: int = 1) -> torch.Tensor:
    """Which next-token predictions count: ``mask[b, t]`` is True when target ``sequences[b, t + 1]`` is trained on.

    A target counts when it lies after the prefix (index ``>= prefix_len``: the start token, or a prompt such as
    a word and its separator), is not ``pad_id``, and no ``eos_id`` precedes it among the targets. The EOS token
    itself is a target (the student must learn to stop). EOS is only looked for after the prefix, so a start
    token equal to EOS, or ``pad_id == eos_id`` (padding with EOS), both work. ``None`` disables a check.
    Sequences are right-padded: position 0 holds the first token.

    Shapes: ``(B, L) -> (B, L - 1)`` bool, aligned with :func:`shift`'s outputs.
    """
    if sequences.dim() != 2 or sequences.shape[1] < 2:
        raise ValueError(f"sequences must be (B, L) with L >= 2, got shape {tuple(sequences.shape)}")
    if prefix_len < 1:
        raise ValueError(f"prefix_len must be >= 1 (position 0 has nothing before it), got {prefix_len}")
    targets = sequences[:, 1:]
    index = torch.arange(1, sequences.shape[1], device=sequences.device)  # index of each target in the sequence
    mask = (index >= prefix_len).expand_as(targets).clone()
    if eos_id is not None:
        is_eos = (targets == eos_id) & mask
        # EOS seen strictly before this target: inclusive cumsum minus this position's own EOS.
        ended = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        mask &= ~ended
        if pad_id is not None:
            mask &= (targets != pad_id) | is_eos  # the first EOS stays a target even when pad_id == eos_id
    elif pad_id is not None:
        mask &= targets != pad_id
    return mask


def _zero(logits: torch.Tensor) -> torch.Tensor:
    """A zero that still belongs to the graph, so ``backward()`` works on a batch with nothing selected."""
    return logits.sum() * 0.0


def word_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """Word-level KD: KL(teacher_T || student_T) · T² per selected position, averaged over the selected positions.

    The T² keeps the gradients' scale as T changes (Hinton et al. 2015). Masked positions are never read, so
    their logits (however extreme) cannot change the loss.

    Shapes: ``(B, T, V), (B, T, V), (B, T) -> scalar``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: the two models must share one vocabulary")
    if not mask.any():
        return _zero(student_logits)
    t = temperature
    log_p_student = F.log_softmax(student_logits[mask].float() / t, dim=-1)  # (N, V), N selected positions
    log_p_teacher = F.log_softmax(teacher_logits[mask].float() / t, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum")
    return kl / mask.sum() * t * t


def sequence_kd_loss(student_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence-level KD: the student's cross-entropy on the teacher's beam output, averaged over selected positions.

    ``targets`` are the beam sequences shifted by one (:func:`shift`).

    Shapes: ``(B, T, V), (B, T), (B, T) -> scalar``.
    """
    if not mask.any():
        return _zero(student_logits)
    return F.cross_entropy(student_logits[mask].float(), targets[mask])


def distill_loss(objective: Objective, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                 targets: torch.Tensor, mask: torch.Tensor, *, temperature: float = 1.0,
                 word_weight: float = 0.5) -> dict[str, torch.Tensor]:
    """The objective's loss and its terms: ``{"loss": ..., "word": ..., "sequence": ...}`` (terms it uses only).

    ``"word"`` reads ``teacher_logits`` (needed) and ignores ``targets``; ``"sequence"`` ignores ``teacher_logits``
    (may be None); ``"both"`` is ``word_weight · word + (1 - word_weight) · sequence`` on the same sequences.

    Shapes: ``(B, T, V), (B, T, V) | None, (B, T), (B, T) -> {str: scalar}``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective != "sequence" and teacher_logits is None:
        raise ValueError(f"objective {objective!r} needs the teacher's logits")
    terms: dict[str, torch.Tensor] = {}
    if objective in ("word", "both"):
        terms["word"] = word_kd_loss(student_logits, teacher_logits, mask, temperature)
    if objective in ("sequence", "both"):
        terms["sequence"] = sequence_kd_loss(student_logits, targets, mask)
    if objective == "both":
        if not 0.0 <= word_weight <= 1.0:
            raise ValueError(f"word_weight must be in [0, 1], got {word_weight}")
        terms["loss"] = word_weight * terms["word"] + (1.0 - word_weight) * terms["sequence"]
    else:
        terms["loss"] = terms[objective]
    return terms
