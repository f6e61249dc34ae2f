"""Architecture registry: ``register_model`` adds a constructor, ``create_model(name, **kwargs)`` builds one.

Constructors take ``input_shape`` and ``num_classes`` plus their own keyword arguments; server-side code can
add architectures with the decorator. Only registered names can be built: a client never names a Python path.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from kegnet.errors import SpecError

ModelFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[F], F]:
    """Decorator: register ``fn(input_shape, num_classes, **kwargs) -> nn.Module`` under ``name``."""

    def wrap(fn: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, *, input_shape: tuple[int, ...], num_classes: int, **kwargs: Any) -> nn.Module:
    """Build the registered architecture ``name``; raise ``SpecError`` with a fixable message otherwise."""
    if name not in _REGISTRY:
        raise SpecError(f"unknown architecture {name!r}; available: {', '.join(list_models())}")
    fn = _REGISTRY[name]
    accepted = set(inspect.signature(fn).parameters) - {"input_shape", "num_classes"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise SpecError(
            f"architecture {name!r} does not take argument(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(sorted(accepted)) or 'none'}"
        )
    try:
        return fn(input_shape=tuple(input_shape), num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as exc:  # bad kwarg values or an input shape the net cannot take
        raise SpecError(f"cannot build {name!r} with these arguments: {exc}") from exc
