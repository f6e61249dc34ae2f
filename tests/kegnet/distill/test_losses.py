"""The KD term and one optimizer step on it."""

import torch
from torch import nn

from kegnet.distill import kd_loss, kd_step


def test_kd_step_returns_the_batch_loss_and_moves_the_student_toward_the_target() -> None:
    torch.manual_seed(0)
    student = nn.Linear(4, 3)
    x, target = torch.randn(16, 4), torch.randn(16, 3) * 3
    before = kd_loss(student(x), target, 2.0).item()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    loss = kd_step(student, optimizer, x, target, 2.0)
    assert not loss.requires_grad and loss.item() == before  # the loss the step was taken on
    assert kd_loss(student(x), target, 2.0).item() < before
    assert kd_loss(target, target, 2.0).item() < 1e-6  # no loss where the student already matches
