"""Multilayer perceptron for tabular inputs (the paper's UCI teacher: 100-unit layers, ELU, dropout 0.15)."""

from __future__ import annotations

import math

from torch import nn

from kegnet.models.registry import register_model

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLP(nn.Module):
    """Shapes: ``(N, F) -> (N, num_classes)`` (inputs of any other shape are flattened).

    Keys: ``layers.{i}`` with Linear at even positions in each (Linear, act, Dropout) triple, then ``head``.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: list[int], activation: str, dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_features
        for width in hidden:
            layers += [nn.Linear(prev, width), _ACTIVATIONS[activation](), nn.Dropout(dropout)]
            prev = width
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x):
        return self.head(self.layers(x.flatten(1)))


@register_model("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: list[int] | None = None,
        activation: str = "elu", dropout: float = 0.15) -> nn.Module:
    hidden = [100, 100] if hidden is None else list(hidden)
    if not 0 <= len(hidden) <= 16 or not all(isinstance(h, int) and 1 <= h <= 16_384 for h in hidden):
        raise ValueError("hidden must be at most 16 integer widths in 1..16384")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError("dropout must be in [0, 1)")
    return MLP(math.prod(input_shape), num_classes, hidden, activation, float(dropout))
