"""Forward hooks that keep intermediate values of a model: named submodule outputs, penultimate features,
BatchNorm input statistics.

Shared by generator training (DAFL's activation reward, the BatchNorm prior), hint matching, relational
distillation and the student's BatchNorm term, so a model's features are read one way everywhere. Every tap
removes its hooks on ``close()`` (or at the end of a ``with`` block): a tap on a caller's module must not
outlive the call that made it.
"""

from __future__ import annotations

import torch
from torch import nn


class Hooks:
    """Owns forward-hook handles; ``close()`` (or leaving a ``with`` block) removes them all."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):  # noqa: ANN204 - returns the subclass
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FeatureTap(Hooks):
    """Keeps the latest output of each named submodule of ``model`` (forward hooks); ``close()`` removes them."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [model.get_submodule(name).register_forward_hook(self._keep(name)) for name in names]

    def _keep(self, name: str):  # noqa: ANN202 - a hook closure
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self.outputs[name] = output

        return hook


class PenultimateTap(Hooks):
    """Keeps the input of the model's last ``nn.Linear`` (its penultimate features) from each forward pass.

    ``value`` has shape ``(N, D)`` (whatever the head receives), or is a 0-d zero before the first pass.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("the model has no nn.Linear classifier head")
        self.value = torch.zeros(())
        self._handles = [linears[-1].register_forward_pre_hook(self._keep)]

    def _keep(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.value = inputs[0]


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """``model``'s BatchNorm layers that keep running statistics (those of its training data)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and m.running_mean is not None]


class BatchNormStatistics(Hooks):
    """Distance of batches' feature statistics to a model's BatchNorm running statistics.

    DeepInversion (Yin et al. 2020): each BatchNorm layer remembers the mean and variance of its input over
    the real training data; samples whose batches reproduce them look like that data to every layer, not
    only to the classifier head. Statistics are taken per ``groups`` equal slices of the batch (one per
    generator in generator training, so each must match them on its own; one for the student's term).
    ``pop()`` returns the sum over layers and passes since the last ``pop`` or ``clear``.
    """

    def __init__(self, model: nn.Module, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.terms: list[torch.Tensor] = []
        self.layers = batchnorm_layers(model)
        self._handles = [m.register_forward_pre_hook(self._measure) for m in self.layers]

    def _measure(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]
        x = x.reshape(self.groups, x.shape[0] // self.groups, x.shape[1], -1)  # (k, b, C, spatial)
        mean = x.mean(dim=(1, 3))
        var = x.var(dim=(1, 3), unbiased=False)
        self.terms.append((mean - module.running_mean).norm(dim=1).mean()
                          + (var - module.running_var).norm(dim=1).mean())

    def pop(self) -> torch.Tensor:
        """The summed distance of the forward passes since the last ``pop`` or ``clear`` (one term per layer
        and pass); clears it."""
        total = torch.stack(self.terms).sum()
        self.terms = []
        return total

    def clear(self) -> None:
        """Forget the passes made so far (e.g. evaluation passes between training steps)."""
        self.terms = []


def ensemble_members(model: nn.Module) -> list[nn.Module]:
    """The models an ensemble combines (a module with a ``members`` ``nn.ModuleList``), else ``[model]``.

    Duck-typed so that generation code can tap every teacher of an ensemble without importing the
    distillation package (which imports generation).
    """
    members = getattr(model, "members", None)
    return list(members) if isinstance(members, nn.ModuleList) else [model]


__all__ = ["BatchNormStatistics", "FeatureTap", "Hooks", "PenultimateTap", "batchnorm_layers", "ensemble_members"]
