"""Distilling an autoregressive student from its teacher on the teacher's own generations (no data read).

:func:`distill_sequence` is the training loop: word-level KD on a transfer set of sampled generations,
sequence-level KD on the teacher's beam outputs, or both on the beam outputs (``kegnet.sequence.objectives``).
Model selection stays data-free: every ``eval_every`` steps an injected ``score(student) -> float`` grades the
student (the integrator's: ``kegnet.sequence.pipeline.agreement``, the student's greedy completions of
held-out prompts against the teacher's) and the best state is kept.

Sequences are right-padded ``LongTensor (N, L)``; see ``objectives.target_mask`` for which positions count.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from kegnet.errors import Cancelled
from kegnet.sequence.objectives import OBJECTIVES, Objective, distill_loss, shift, target_mask

log = logging.getLogger(__name__)

Progress = Callable[[int, int, dict[str, float]], None]


@dataclass
class SequenceDistillResult:
    """What the loop did. The student holds the state of ``best_step`` on return."""

    best_step: int
    best_score: float
    initial_score: float
    loss_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since the last eval)
    score_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, score); step 0 = before training


def cosine_lr(step: int, steps: int, lr: float, warmup: int = 0, min_lr: float = 0.0) -> float:
    """nanoGPT's schedule: linear warmup over ``warmup`` steps, then cosine decay from ``lr`` to ``min_lr``.

    ``step`` counts from 0; the last step (``steps - 1``) is just above ``min_lr``.
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (lr - min_lr)


def _check_sequences(name: str, data: torch.Tensor) -> None:
    if data.dim() != 2 or data.shape[0] == 0 or data.shape[1] < 2:
        raise ValueError(f"{name} must be a (N, L) tensor with N >= 1 and L >= 2, got shape {tuple(data.shape)}")
    if data.dtype != torch.long:
        raise ValueError(f"{name} must hold token ids (torch.long), got {data.dtype}")


def _trim(inputs: torch.Tensor, targets: torch.Tensor,
          mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drops trailing columns with no selected target: the model is causal, so the kept logits do not change.

    Shapes: ``(B, T), (B, T), (B, T) -> (B, T'), (B, T'), (B, T')`` with ``1 <= T' <= T``.
    """
    used = mask.any(0).nonzero()
    keep = int(used[-1]) + 1 if len(used) else 1
    return inputs[:, :keep], targets[:, :keep], mask[:, :keep]


def _batches(n: int, batch_size: int, rng: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of indices into ``n`` sequences: a fresh permutation each epoch, every batch full."""
    batch_size = min(batch_size, n)
    order = torch.empty(0, dtype=torch.long)
    while True:
        while len(order) < batch_size:  # an epoch ends mid-batch: top up from the next permutation
            order = torch.cat([order, torch.randperm(n, generator=rng)])
        yield order[:batch_size]
        order = order[batch_size:]


@contextlib.contextmanager
def _seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seeds torch's global RNG (dropout draws from it) for the loop only; the caller's state comes back after."""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def _module_modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _restore_modes(modes: dict[nn.Module, bool]) -> None:
    for m, training in modes.items():
        m.training = training


def _training_set(objective: Objective, samples: torch.Tensor | None,
                  beams: torch.Tensor | None) -> torch.Tensor:
    """The set the objective trains on: samples for ``"word"``, beam outputs for ``"sequence"`` and ``"both"``.

    A set the objective does not use is refused rather than silently ignored.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective == "word":
        if samples is None:
            raise ValueError("objective 'word' needs samples (the teacher's sampled generations)")
        if beams is not None:
            raise ValueError("objective 'word' trains on samples only; pass beams=None")
        return samples
    if beams is None:
        raise ValueError(f"objective {objective!r} needs beams (the teacher's beam-search outputs)")
    if samples is not None:
        raise ValueError(f"objective {objective!r} trains on the beam outputs only (the word term of 'both' uses "
                         "the teacher's distribution along the beams, as Kim & Rush); pass samples=None")
    return beams


def distill_sequence(
    student: nn.Module, teacher: nn.Module, *, objective: Objective, samples: torch.Tensor | None = None,
    beams: torch.Tensor | None = None, pad_id: int | None, eos_id: int | None, prefix_len: int = 1, steps: int,
    batch_size: int = 64, lr: float = 1e-3, warmup_steps: int = 0, min_lr: float = 0.0, temperature: float = 1.0,
    word_weight: float = 0.5, grad_clip: float = 1.0, eval_every: int = 100, score: Callable[[nn.Module], float],
    device: torch.device, seed: int, progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> SequenceDistillResult:
    """Train ``student`` in place to match ``teacher`` on its generations; the best-scoring state is kept.

    ``objective``: ``"word"`` trains on ``samples`` (the teacher's sampled generations, ``(N, L)``),
    ``"sequence"`` and ``"both"`` on ``beams`` (its beam-search outputs, ``(M, L')``); the unused set must be
    None. Teacher logits are computed per batch (eval mode, no grad). Adam at ``lr`` with ``warmup_steps`` of
    linear warmup then cosine decay to ``min_lr``; gradients clipped to norm ``grad_clip`` (``<= 0``: off).
    ``score(student)`` (higher is better, called in eval mode without grad) runs before training (step 0) and
    every ``eval_every`` steps and at the last; on ties the later step wins. ``progress(step, steps, metrics)``
    is called after each score with ``score`` and, from step 1, ``loss``, ``lr`` and the objective's terms.
    ``should_cancel()`` is checked before every step; True raises :class:`kegnet.errors.Cancelled` (the student
    is then left as it is). ``seed`` fixes the batch order and torch's global RNG inside the loop (dropout);
    the caller's RNG state is restored after.
    """
    data = _training_set(objective, samples, beams)
    _check_sequences("samples" if objective == "word" else "beams", data)
    if steps < 0 or batch_size < 1 or eval_every < 1:
        raise ValueError(f"need steps >= 0, batch_size >= 1, eval_every >= 1; got {steps}, {batch_size}, {eval_every}")
    if temperature <= 0 or not 0.0 <= word_weight <= 1.0:
        raise ValueError(f"need temperature > 0 and word_weight in [0, 1]; got {temperature}, {word_weight}")
    mask_all = target_mask(data, pad_id=pad_id, eos_id=eos_id, prefix_len=prefix_len)
    if not mask_all.any():
        raise ValueError("the training sequences have no target position after the prefix: nothing to learn")

    teacher.eval()
    with _seeded_global_rng(seed, device):
        return _train(student, teacher, objective, data, mask_all, steps=steps, batch_size=batch_size, lr=lr,
                      warmup_steps=warmup_steps, min_lr=min_lr, temperature=temperature, word_weight=word_weight,
                      grad_clip=grad_clip, eval_every=eval_every, score=score, device=device, seed=seed,
                      progress=progress, should_cancel=should_cancel)


def _evaluate(student: nn.Module, score: Callable[[nn.Module], float]) -> float:
    modes = _module_modes(student)
    student.eval()
    try:
        with torch.no_grad():
            return float(score(student))
    finally:
        _restore_modes(modes)


def _snapshot(student: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


def _train(student: nn.Module, teacher: nn.Module, objective: Objective, data: torch.Tensor, mask_all: torch.Tensor,
           *, steps: int, batch_size: int, lr: float, warmup_steps: int, min_lr: float, temperature: float,
           word_weight: float, grad_clip: float, eval_every: int, score: Callable[[nn.Module], float],
           device: torch.device, seed: int, progress: Progress | None,
           should_cancel: Callable[[], bool] | None) -> SequenceDistillResult:
    """The loop of :func:`distill_sequence`, its inputs checked."""
    # the grade before any training: the compressed student may already be the best there is
    first = _evaluate(student, score)
    result = SequenceDistillResult(best_step=0, best_score=first, initial_score=first, score_curve=[(0, first)])
    best_state = _snapshot(student)
    if progress is not None:
        progress(0, steps, {"score": first})

    rng = torch.Generator().manual_seed(seed)  # on the CPU: the same batch order on every device
    batches = _batches(len(data), batch_size, rng)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    sums: dict[str, torch.Tensor] = {}  # loss terms summed on the device since the last eval: no sync per step
    since_eval = 0
    student.train()
    for step in range(1, steps + 1):
        if should_cancel is not None and should_cancel():
            raise Cancelled("cancelled while distilling the sequence student")

        # learning rate of this step: warmup, then cosine decay
        lr_now = cosine_lr(step - 1, steps, lr, warmup_steps, min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr_now

        # a batch of sequences, cut after its last target (padding costs compute and changes nothing)
        idx = next(batches).to(data.device)
        inputs, targets, mask = _trim(*shift(data[idx].to(device)), mask_all[idx].to(device))

        # forward: the teacher only when its soft outputs are used (word term)
        teacher_logits = None
        if objective != "sequence":
            with torch.no_grad():
                teacher_logits = teacher(inputs)
        terms = distill_loss(objective, student(inputs), teacher_logits, targets, mask,
                             temperature=temperature, word_weight=word_weight)

        # backward, clip, update
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
        optimizer.step()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.detach()
        since_eval += 1

        # data-free model selection: grade, keep the best state
        if step % eval_every == 0 or step == steps:
            metrics = {name: float(total) / since_eval for name, total in sums.items()}
            sums, since_eval = {}, 0
            current = _evaluate(student, score)
            result.loss_curve.append((step, metrics["loss"]))
            result.score_curve.append((step, current))
            if current >= result.best_score:
                result.best_step, result.best_score = step, current
                best_state = _snapshot(student)
            metrics.update(score=current, lr=lr_now)
            log.info("step %d/%d: loss %.4f, score %.4f (best %.4f at step %d)", step, steps, metrics["loss"],
                     current, result.best_score, result.best_step)
            if progress is not None:
                progress(step, steps, metrics)
    student.load_state_dict(best_state)
    return result
