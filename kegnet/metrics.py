"""Model size and cost: parameters, multiply-accumulates, agreement between two models."""

from __future__ import annotations

from collections.abc import Callable

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

    forward_with_hooks(model, input_shape, hook, [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)])
    return int(total)


def forward_with_hooks(model: nn.Module, input_shape: tuple[int, ...], hook: Callable[..., None],
                       modules: list[nn.Module], dtype: torch.dtype = torch.float32) -> None:
    """One eval-mode forward pass of one zero sample of ``input_shape`` (``dtype=torch.long``: token ids),
    on the model's device, with the forward ``hook`` on each of ``modules``; hooks and the model's mode are
    restored afterwards."""
    handles = [m.register_forward_hook(hook) for m in modules]
    was_training = model.training
    model.eval()
    try:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=dtype, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


@torch.no_grad()
def agreement(a: nn.Module, b: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> float:
    """Fraction of samples of ``x`` on which ``a`` and ``b`` predict the same class."""
    same = 0
    for chunk in x.split(batch_size):
        same += (a(chunk).argmax(1) == b(chunk).argmax(1)).sum().item()
    return same / len(x)
