"""Model size and cost: parameters, multiply-accumulates, agreement between two models."""

from __future__ import annotations

import torch
from torch import nn


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of Conv2d and Linear layers for one sample of ``input_shape``."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += output[0].numel() * (module.in_channels // module.groups) * k
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features * (output[0].numel() // module.out_features)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return int(total)


@torch.no_grad()
def agreement(a: nn.Module, b: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> float:
    """Fraction of samples of ``x`` on which ``a`` and ``b`` predict the same class."""
    same = 0
    for chunk in x.split(batch_size):
        same += (a(chunk).argmax(1) == b(chunk).argmax(1)).sum().item()
    return same / len(x)
