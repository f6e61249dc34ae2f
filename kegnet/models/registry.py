"""Architecture registry: ``register_model`` adds a constructor, ``create_model(name, **kwargs)`` builds one.

Constructors take ``input_shape`` and ``num_classes`` plus their own keyword arguments; server-side code can
add architectures with the decorator. ``torchvision:<name>`` and ``timm:<name>`` build those libraries'
models (kegnet/models/libraries.py). Only listed names can be built: a client never names a Python path.

Sequence models (autoregressive, token in -> next-token logits out) have their own registry:
``register_sequence_model`` adds a constructor ``fn(vocab_size, max_length, **kwargs)`` and
``create_sequence_model(name, vocab_size=..., max_length=...)`` builds one; its names are apart from the
classifiers' (``transformer`` is kegnet/models/transformer.py).

``create_model`` and ``create_sequence_model`` first build the model on the meta device (no memory) and refuse
it when it has more than ``max_parameters`` parameters, so a spec cannot make the server allocate a huge model.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

from kegnet.errors import SpecError
from kegnet.models import libraries

ModelFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}
_SEQUENCE_REGISTRY: dict[str, ModelFactory] = {}
_LIBRARIES: dict[str, ModelFactory] = {"torchvision": libraries.build_torchvision, "timm": libraries.build_timm}

# Parameters of the largest model built by default (ViT-L is 304 M); callers pass their own cap.
DEFAULT_MAX_PARAMETERS = 400_000_000


def _registrar(registry: dict[str, ModelFactory], name: str, kind: str) -> Callable[[F], F]:
    """The decorator that adds a constructor to ``registry`` under ``name`` (``kind`` names it in errors)."""

    def wrap(fn: F) -> F:
        if name in registry:
            raise ValueError(f"{kind} {name!r} is already registered")
        registry[name] = fn
        return fn

    return wrap


def register_model(name: str) -> Callable[[F], F]:
    """Decorator: register ``fn(input_shape, num_classes, **kwargs) -> nn.Module`` under ``name``."""
    return _registrar(_REGISTRY, name, "architecture")


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _factory(name: str) -> tuple[ModelFactory, dict[str, Any]]:
    """The constructor for ``name`` and the arguments it gets besides the spec's kwargs."""
    source, short = libraries.split_arch(name)
    if source in _LIBRARIES:
        return _LIBRARIES[source], {"name": short}
    if source == "kegnet" and name not in _REGISTRY and name in _SEQUENCE_REGISTRY:
        raise SpecError(f"{name!r} is a sequence model: give vocabulary size and maximum length, not input shape "
                        "and classes")
    if source != "kegnet" or name not in _REGISTRY:
        raise SpecError(f"unknown architecture {name!r}; available: {', '.join(list_models())}, "
                        "torchvision:<name>, timm:<name>, or onnx (upload an .onnx file)")
    fn = _REGISTRY[name]
    return fn, {}


def _build(name: str, input_shape: tuple[int, ...], num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    fn, fixed = _factory(name)
    if not fixed:  # a registered constructor: its signature says which arguments it takes
        _check_kwargs(name, fn, kwargs, {"input_shape", "num_classes"})
    return _construct(name, fn, input_shape=tuple(input_shape), num_classes=num_classes, **fixed, **kwargs)


def _construct(arch: str, fn: ModelFactory, /, **arguments: Any) -> nn.Module:
    """``fn(**arguments)``, its complaint about bad values (or a shape the net rejects) as a ``SpecError``.
    Positional-only: the library builders take a ``name`` argument of their own."""
    try:
        return fn(**arguments)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise SpecError(f"cannot build {arch!r} with these arguments: {exc}") from exc


def _check_kwargs(name: str, fn: ModelFactory, kwargs: dict[str, Any], positional: set[str]) -> None:
    """Refuse ``kwargs`` that ``fn``'s signature does not name (besides the ``positional`` spec arguments)."""
    accepted = set(inspect.signature(fn).parameters) - positional
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise SpecError(
            f"architecture {name!r} does not take argument(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(sorted(accepted)) or 'none'}"
        )


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside moves to the meta device at once (as accelerate's
    ``init_empty_weights``): for constructors that compute on real tensors (torchvision's RegNet sizes its
    stages with numpy), so only one parameter at a time is ever allocated."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def count_model_parameters(name: str, *, input_shape: tuple[int, ...], num_classes: int, **kwargs: Any) -> int:
    """Parameters of the architecture, counted without allocating them (built on the meta device)."""
    return _count_on_meta(lambda: _build(name, input_shape, num_classes, dict(kwargs)))


def _count_on_meta(build: Callable[[], nn.Module]) -> int:
    """Parameters of the model ``build`` returns, built on the meta device."""
    try:
        with torch.device("meta"):
            model = build()
    except SpecError as exc:
        if "meta" not in str(exc):
            raise
        with _parameters_on_meta():  # the constructor needs real tensors for its own arithmetic
            model = build()
    return sum(p.numel() for p in model.parameters())


def _refuse_above(name: str, count: int, max_parameters: int) -> None:
    if count > max_parameters:
        raise SpecError(f"{name!r} with these arguments has {count:,} parameters, above this service's limit "
                        f"of {max_parameters:,}; choose a smaller architecture or arguments")


def create_model(name: str, *, input_shape: tuple[int, ...], num_classes: int,
                 max_parameters: int | None = DEFAULT_MAX_PARAMETERS, **kwargs: Any) -> nn.Module:
    """Build the architecture ``name``; raise ``SpecError`` with a fixable message otherwise.

    With ``max_parameters``, the model is counted on the meta device first and refused above the cap.
    """
    if max_parameters is not None:
        _refuse_above(name, count_model_parameters(name, input_shape=input_shape, num_classes=num_classes, **kwargs),
                      max_parameters)
    return _build(name, input_shape, num_classes, dict(kwargs))


def register_sequence_model(name: str) -> Callable[[F], F]:
    """Decorator: register ``fn(vocab_size, max_length, **kwargs) -> nn.Module`` under ``name``; the model
    maps tokens ``(B, T)`` to next-token logits ``(B, T, vocab_size)``."""
    return _registrar(_SEQUENCE_REGISTRY, name, "sequence architecture")


def list_sequence_models() -> list[str]:
    return sorted(_SEQUENCE_REGISTRY)


def _build_sequence(name: str, vocab_size: int, max_length: int, kwargs: dict[str, Any]) -> nn.Module:
    if name not in _SEQUENCE_REGISTRY:
        hint = " (a classifier: give input shape and classes)" if name in _REGISTRY else ""
        raise SpecError(f"unknown sequence architecture {name!r}{hint}; available: "
                        f"{', '.join(list_sequence_models()) or 'none'}")
    fn = _SEQUENCE_REGISTRY[name]
    _check_kwargs(name, fn, kwargs, {"vocab_size", "max_length"})
    return _construct(name, fn, vocab_size=vocab_size, max_length=max_length, **kwargs)


def count_sequence_model_parameters(name: str, *, vocab_size: int, max_length: int, **kwargs: Any) -> int:
    """Parameters of the sequence architecture, counted without allocating them (built on the meta device)."""
    return _count_on_meta(lambda: _build_sequence(name, vocab_size, max_length, dict(kwargs)))


def create_sequence_model(name: str, *, vocab_size: int, max_length: int,
                          max_parameters: int | None = DEFAULT_MAX_PARAMETERS, **kwargs: Any) -> nn.Module:
    """Build the sequence architecture ``name`` (tokens ``(B, T)`` -> logits ``(B, T, vocab_size)``); raise
    ``SpecError`` with a fixable message otherwise.

    With ``max_parameters``, the model is counted on the meta device first and refused above the cap.
    """
    if max_parameters is not None:
        _refuse_above(name, count_sequence_model_parameters(name, vocab_size=vocab_size, max_length=max_length,
                                                            **kwargs), max_parameters)
    return _build_sequence(name, vocab_size, max_length, dict(kwargs))
