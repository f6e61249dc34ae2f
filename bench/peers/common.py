"""What the peer methods share: the wall-time clock, the distillation loss, the student's training mode.

A peer trains the student in place and returns a ``PeerResult`` with the steps it reached in its time.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

from torch import nn

# Bounds on what a caller may ask of a peer (the bench's own figures are far below them).
MAX_SECONDS = 24 * 3600.0
MAX_BATCH = 4096


class Clock:
    """A wall-time budget that starts when made; ``left()`` is what remains, never below 0."""

    def __init__(self, seconds: float) -> None:
        if not 0 < seconds <= MAX_SECONDS:
            raise ValueError(f"seconds must be in (0, {MAX_SECONDS:g}], got {seconds}")
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return max(0.0, self.seconds - self.elapsed())

    def spent(self, share: float = 1.0) -> bool:
        """Whether ``share`` of the budget has passed."""
        return self.elapsed() >= share * self.seconds


@dataclass
class PeerResult:
    """What a peer did in its time: steps by kind (e.g. generator, student), and the seconds it took."""

    method: str
    steps: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    settings: dict[str, float | int | str] = field(default_factory=dict)


def train_mode(student: nn.Module) -> nn.Module:
    """The student in training mode with BatchNorm and dropout held in eval, as KegNet's own fine-tuning
    holds them (kegnet/distill/train.py): the student starts from the teacher's factorized weights, and
    synthetic batches would overwrite the teacher's running statistics. Only the data differs between rows."""
    student.train()
    for m in student.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.modules.dropout._DropoutNd):
            m.eval()
    return student


def frozen(teacher: nn.Module) -> nn.Module:
    """A copy of the teacher in eval mode with no gradient into its weights (gradients still reach its
    inputs); the caller's module is left as it was."""
    teacher = copy.deepcopy(teacher)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def check_batch(batch_size: int) -> int:
    if not 2 <= batch_size <= MAX_BATCH:
        raise ValueError(f"batch_size must be in [2, {MAX_BATCH}], got {batch_size}")
    return batch_size
