"""The architecture registry: ``register_model`` adds a constructor, ``create_model(name, **arguments)`` builds one.

One registry for every kind of model. A constructor is registered for a task, which says which arguments
describe the data it models (its "spec arguments"):

- ``classify``: ``fn(input_shape, num_classes, **kwargs)``, a classifier (built-ins ``lenet5``, ``resnet``,
  ``mlp``; ``torchvision:<name>`` and ``timm:<name>`` build those libraries' models, kegnet/models/libraries.py);
- ``sequence``: ``fn(vocab_size, max_length, **kwargs)``, an autoregressive model, tokens ``(B, T)`` in,
  next-token logits ``(B, T, vocab_size)`` out (``transformer``, kegnet/models/transformer.py).

Server-side code can add architectures with the decorator. Only listed names can be built: a client never
names a Python path. ``create_model`` first builds the model on the meta device (no memory) and refuses it
when its parameters and buffer elements are more than ``max_parameters``, so a spec cannot make the server
allocate a huge model.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from kegnet.errors import SpecError
from kegnet.models import libraries

ModelFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFactory)

# The arguments each task's constructors take from the spec (kegnet.spec.ModelSpec.model_arguments).
SPEC_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "classify": ("input_shape", "num_classes"),
    "sequence": ("vocab_size", "max_length"),
}
# What to give instead, when the arguments of another task were given.
_GIVE = {"classify": "input shape and classes", "sequence": "vocabulary size and maximum length"}
_KIND = {"classify": "classifier", "sequence": "sequence model"}
_UNKNOWN = {"classify": "architecture", "sequence": "sequence architecture"}
_ALSO = {"classify": ", torchvision:<name>, timm:<name>, or onnx (upload an .onnx file)"}


@dataclass(frozen=True)
class Entry:
    """A registered constructor and the task its models serve."""

    fn: ModelFactory
    task: str


_REGISTRY: dict[str, Entry] = {}
_LIBRARIES: dict[str, ModelFactory] = {"torchvision": libraries.build_torchvision, "timm": libraries.build_timm}

# Parameters of the largest model built by default (ViT-L is 304 M); callers pass their own cap.
DEFAULT_MAX_PARAMETERS = 400_000_000


def register_model(name: str, *, task: str = "classify") -> Callable[[F], F]:
    """Decorator: register a constructor under ``name``; it takes the ``task``'s spec arguments
    (``SPEC_ARGUMENTS``) and its own keyword arguments, and returns an ``nn.Module``."""
    if task not in SPEC_ARGUMENTS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(SPEC_ARGUMENTS)}")

    def wrap(fn: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is already registered")
        _REGISTRY[name] = Entry(fn, task)
        return fn

    return wrap


def list_models(task: str | None = None) -> list[str]:
    """Registered names (of one ``task``'s models, or all); library models are named ``torchvision:<name>``
    and ``timm:<name>``."""
    return sorted(name for name, entry in _REGISTRY.items() if task is None or entry.task == task)


def _task_of(arguments: dict[str, Any]) -> str:
    """The task whose spec arguments were given (classify when none are)."""
    return next((task for task, names in SPEC_ARGUMENTS.items() if names[0] in arguments), "classify")


def _factory(name: str, task: str) -> tuple[ModelFactory, dict[str, Any]]:
    """The constructor for ``name`` (asked for with ``task``'s arguments) and what it gets besides them."""
    source, short = libraries.split_arch(name)
    if source in _LIBRARIES:
        if task != "classify":
            raise SpecError(f"{name!r} is a {_KIND['classify']}: give {_GIVE['classify']}, not {_GIVE[task]}")
        return _LIBRARIES[source], {"name": short}
    entry = _REGISTRY.get(name) if source == "kegnet" else None
    if entry is None:
        available = ", ".join(list_models(task)) or "none"
        raise SpecError(f"unknown {_UNKNOWN[task]} {name!r}; available: {available}{_ALSO.get(task, '')}")
    if entry.task != task:
        raise SpecError(f"{name!r} is a {_KIND[entry.task]}: give {_GIVE[entry.task]}, not {_GIVE[task]}")
    return entry.fn, {}


def _build(name: str, arguments: dict[str, Any]) -> nn.Module:
    """``arguments``: the task's spec arguments and the architecture's own keyword arguments."""
    task = _task_of(arguments)
    spec_names = SPEC_ARGUMENTS[task]
    missing = [a for a in spec_names if a not in arguments]
    if missing:
        raise SpecError(f"architecture {name!r} needs {', '.join(spec_names)}; missing {', '.join(missing)}")
    fn, fixed = _factory(name, task)
    kwargs = {k: v for k, v in arguments.items() if k not in spec_names}
    if not fixed:  # a registered constructor: its signature says which arguments it takes
        _check_kwargs(name, fn, kwargs, set(spec_names))
    spec_values = {k: tuple(arguments[k]) if k == "input_shape" else arguments[k] for k in spec_names}
    return _construct(name, fn, **spec_values, **fixed, **kwargs)


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


def count_model_parameters(name: str, **arguments: Any) -> int:
    """Parameters of the architecture, counted without allocating them (built on the meta device)."""
    return sum(p.numel() for p in build_on_meta(name, **arguments).parameters())


def build_on_meta(name: str, **arguments: Any) -> nn.Module:
    """The architecture built on the meta device: shapes, no memory (``create_model``'s arguments)."""
    return _on_meta(lambda: _build(name, dict(arguments)))


def _on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """The model ``build`` returns, built on the meta device (its parameters only, for the few constructors
    that compute on real tensors: their buffers are real then)."""
    try:
        with torch.device("meta"):
            return build()
    except SpecError as exc:
        if "meta" not in str(exc):
            raise
        with _parameters_on_meta():  # the constructor needs real tensors for its own arithmetic
            return build()


def model_size(model: nn.Module) -> tuple[int, int]:
    """(parameters, buffer elements) of a model, real or on the meta device."""
    return sum(p.numel() for p in model.parameters()), sum(b.numel() for b in model.buffers())


def refuse_above(name: str, count: int, max_parameters: int, buffers: int = 0) -> None:
    """Raise ``SpecError`` when ``name``'s ``count`` parameters and ``buffers`` buffer elements together are
    over ``max_parameters``: buffers (attention position tables, running statistics) take memory too."""
    if count > max_parameters:
        raise SpecError(f"{name!r} with these arguments has {count:,} parameters, above this service's limit "
                        f"of {max_parameters:,}; choose a smaller architecture or arguments")
    if count + buffers > max_parameters:
        raise SpecError(f"{name!r} with these arguments has {count:,} parameters and {buffers:,} buffer elements "
                        f"(buffers take memory too), above this service's limit of {max_parameters:,} in all; "
                        "choose a smaller architecture or arguments")


def create_model(name: str, *, max_parameters: int | None = DEFAULT_MAX_PARAMETERS, **arguments: Any) -> nn.Module:
    """Build the architecture ``name`` from its task's spec arguments (``input_shape`` and ``num_classes``, or
    ``vocab_size`` and ``max_length``) and its own keyword arguments; raise ``SpecError`` with a fixable message
    otherwise.

    With ``max_parameters``, the model is counted on the meta device first (parameters and buffer elements)
    and refused above the cap.
    """
    if max_parameters is not None:
        parameters, buffers = model_size(build_on_meta(name, **arguments))
        refuse_above(name, parameters, max_parameters, buffers)
    return _build(name, dict(arguments))
