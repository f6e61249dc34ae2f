"""Loading a stranger's weights safely and checking them against the model spec.

Only two readers are ever used: safetensors, and ``torch.load(weights_only=True)``, which refuses any
pickled object other than tensors and plain containers (so code in the file never runs). Every failure
becomes a ``CheckpointError`` or ``SpecError`` whose message tells the user what to fix. The file's structure
is checked first (``kegnet.file_safety``), so that no reader allocates more than the file's budget.
"""

from __future__ import annotations

import logging
import pickle
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import nn

from kegnet.errors import CheckpointError, SpecError
from kegnet.file_safety import DAMAGED, HOW_TO_SAVE, NESTED_KEYS, NOT_WEIGHTS, check_checkpoint_file
from kegnet.metrics import count_parameters
from kegnet.models import create_model
from kegnet.models.libraries import library_version
from kegnet.models.registry import DEFAULT_MAX_PARAMETERS
from kegnet.spec import ModelSpec

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]



def read_state_dict(path: str | Path, *, max_bytes: int | None = None) -> StateDict:
    """Read a ``.safetensors`` or ``torch.save`` file into a flat ``{name: tensor}`` dict on the CPU.

    ``max_bytes`` is the memory budget of the tensors the file may declare (default: the file's own size):
    the file is inspected first (``check_checkpoint_file``) so that nothing larger is ever allocated.
    """
    path = Path(path)
    kind = check_checkpoint_file(path, max_bytes=max_bytes)
    if kind == "safetensors":
        try:
            return _unwrap(load_safetensors(str(path), device="cpu"))
        except (SafetensorError, ValueError, OSError) as exc:
            log.info("safetensors refused %s: %s", path.name, exc)
            raise CheckpointError("the safetensors file is damaged or truncated; save it again with "
                                  "safetensors.torch.save_file") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refused a global: the file carries objects (possibly code) beyond tensors.
        log.warning("refused a checkpoint that is not weights-only: %s", str(exc).splitlines()[0])
        raise CheckpointError(NOT_WEIGHTS) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, struct.error) as exc:
        # torch's own message may advise weights_only=False: log it, never pass it on.
        log.info("torch.load refused %s: %s", path.name, str(exc).splitlines()[0] if str(exc) else type(exc))
        raise CheckpointError(DAMAGED) from exc
    return _unwrap(obj)


def _unwrap(obj: object) -> StateDict:
    """Find the state dict in ``obj`` (possibly nested one level) and check it holds only tensors."""
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in NESTED_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"the checkpoint does not hold a state dict of tensors; {HOW_TO_SAVE}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"the state dict has non-tensor entries: {', '.join(bad[:5])}")
    # Checkpoints saved from nn.DataParallel prefix every key with "module.".
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def check_finite(state: StateDict) -> None:
    """Raise if any floating-point tensor holds NaN or infinity."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"weights contain NaN or infinite values in: {', '.join(bad[:5])}")


def check_state_keys(spec: ModelSpec, expected: Mapping[str, tuple[int, ...]],
                     state: Mapping[str, tuple[int, ...]]) -> None:
    """Raise ``SpecError`` when the weights' keys or shapes (``state``: name -> shape) differ from the
    architecture's (``expected``: its state dict's shapes), naming the keys and the spec fields to check."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}")
        raise SpecError(f"the weights do not match architecture {spec.arch!r} ({'; '.join(parts)})")
    wrong = [
        f"{k} is {tuple(state[k])} but {spec.arch!r} expects {tuple(v)}"
        for k, v in expected.items() if tuple(state[k]) != tuple(v)
    ]
    if wrong:
        raise SpecError("shape mismatch: " + "; ".join(wrong[:4]) + f" (check {spec.shape_fields})")


def build_teacher(spec: ModelSpec, state: StateDict, *, max_parameters: int | None = DEFAULT_MAX_PARAMETERS
                  ) -> nn.Module:
    """Build ``spec``'s architecture, load ``state`` strictly, and check one forward pass on ``input_shape``.

    The architecture is counted on the meta device first and refused above ``max_parameters``.
    """
    model = create_model(spec.arch, max_parameters=max_parameters, **spec.model_arguments(), **spec.kwargs())
    check_state_keys(spec, {k: tuple(v.shape) for k, v in model.state_dict().items()},
                     {k: tuple(v.shape) for k, v in state.items()})
    check_finite(state)
    model.load_state_dict(state, strict=True)
    _check_forward(model, spec)
    return model


def _check_forward(model: nn.Module, spec: ModelSpec) -> None:
    """One forward pass on the spec's probe (``ModelSpec.probe``: zeros of ``input_shape`` must give
    ``(2, num_classes)`` logits; BOS tokens ``(2, 2)`` must give ``(2, 2, vocab_size)``)."""
    model.eval()
    x, expected, described = spec.probe()
    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError) as exc:
        raise SpecError(f"the model cannot run on {described}: {exc}") from exc
    if tuple(out.shape) != expected:
        raise SpecError(f"the model outputs shape {tuple(out.shape)} for {described}, expected {expected}")


@dataclass
class LoadedTeacher:
    """A teacher built from an upload: the module (eval mode, CPU), its spec with input shape and class
    count filled in (an ONNX graph supplies them), and where its architecture came from (for the manifest)."""

    model: nn.Module
    spec: ModelSpec
    architecture: dict[str, Any] = field(default_factory=dict)


def open_teacher(path: str | Path, spec: ModelSpec, *, max_parameters: int | None = DEFAULT_MAX_PARAMETERS,
                 onnx_limits: Any = None, max_bytes: int | None = None) -> LoadedTeacher:
    """Read an uploaded checkpoint (state dict, safetensors, or an ONNX graph for ``arch="onnx"``) and build
    the teacher it describes. ``max_bytes``: the file's budget (``read_state_dict``; for a graph, the bytes
    of ``OnnxLimits`` unless ``onnx_limits`` is given)."""
    if spec.arch == "onnx":
        if onnx_limits is None and max_bytes is not None:  # the same byte budget bounds a graph
            from kegnet.models.onnx_graph import OnnxLimits

            onnx_limits = OnnxLimits(max_bytes=max_bytes, max_initializer_bytes=max_bytes)
        return _open_onnx(Path(path), spec, max_parameters, onnx_limits)
    model = build_teacher(spec, read_state_dict(path, max_bytes=max_bytes), max_parameters=max_parameters)
    return LoadedTeacher(model, spec, architecture_of(spec))


def architecture_of(spec: ModelSpec) -> dict[str, Any]:
    """Where a spec's architecture comes from, for the manifest: source, name, kwargs, library version."""
    architecture = {"source": spec.source, "name": spec.arch.partition(":")[2] or spec.arch, "kwargs": spec.kwargs()}
    if library_version(spec.source):
        architecture["library_version"] = library_version(spec.source)
    return architecture


def resolve_onnx_spec(spec: ModelSpec, declared: tuple[int | None, ...], declared_classes: int | None
                      ) -> ModelSpec:
    """``spec`` with the input shape and class count an ONNX graph declares filled in (``declared``: its
    input shape without the batch, ``None`` where it is free); raises ``SpecError`` when they disagree."""
    if spec.arch_kwargs:
        raise SpecError("an onnx architecture takes no arch_kwargs: everything is in the graph")
    shape = spec.input_shape
    if shape is None:
        if any(d is None for d in declared):
            raise SpecError(f"the ONNX graph leaves its input size free ({_dims(declared)}); give input_shape")
        shape = tuple(int(d) for d in declared)  # type: ignore[arg-type]
    elif len(shape) != len(declared) or any(d is not None and d != s for d, s in zip(declared, shape, strict=False)):
        raise SpecError(f"input_shape {_dims(shape)} does not match the ONNX graph's input {_dims(declared)}")
    classes = spec.num_classes or declared_classes
    if classes is None:
        raise SpecError("the ONNX graph does not declare its class count; give num_classes")
    if spec.num_classes and declared_classes and spec.num_classes != declared_classes:
        raise SpecError(f"num_classes {spec.num_classes} does not match the ONNX graph's output "
                        f"({declared_classes} classes)")
    return ModelSpec(arch="onnx", input_shape=shape, num_classes=classes)  # validates the bounds too


def _open_onnx(path: Path, spec: ModelSpec, max_parameters: int | None, limits: Any) -> LoadedTeacher:
    from kegnet.models import onnx_graph

    if spec.arch_kwargs:  # before the graph is read
        raise SpecError("an onnx architecture takes no arch_kwargs: everything is in the graph")
    graph = onnx_graph.read_graph(path, limits)
    resolved = resolve_onnx_spec(spec, graph.input_shape, graph.num_classes)
    model = onnx_graph.to_torch(graph)
    count = count_parameters(model)
    if max_parameters is not None and count > max_parameters:
        raise SpecError(f"the ONNX graph has {count:,} parameters, above this service's limit of "
                        f"{max_parameters:,}")
    check_finite({k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)})
    _check_forward(model, resolved)
    return LoadedTeacher(model, resolved, {"source": "onnx", **graph.info})


def _dims(shape: tuple[int | None, ...]) -> str:
    return ",".join("?" if d is None else str(d) for d in shape)


def load_teacher(path: str | Path, spec: ModelSpec, *, max_parameters: int | None = DEFAULT_MAX_PARAMETERS
                 ) -> nn.Module:
    """Read a checkpoint and build the teacher it describes; the model is in eval mode on the CPU."""
    return open_teacher(path, spec, max_parameters=max_parameters).model
