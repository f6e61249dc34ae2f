"""Checks a job before it runs: the one validation path shared by the API and the pipeline.

Two parts:

- ``check_static``: what never runs the model nor reads its weights. The task's rules (kegnet.tasks: how many
  teachers, whether an evaluation set applies), each file's structure (kegnet.file_safety via
  ``check_checkpoint_file``: sizes, counts, no code, tensors that own their storage), the architecture built
  once on the meta device (no memory) and counted (parameters and buffers), each file's declared keys and
  shapes against it (``declared_tensors``: headers and simulated pickles), the task's structural checks
  (``Task.check_structure``), the job's cost from the meta model's profile (kegnet.cost: every matmul,
  convolution and attention, counted on meta), and the evaluation set. An ONNX graph is read and priced
  from its inferred shapes (kegnet.models.onnx_graph.static_profile). Cheap and bounded in time and memory:
  the API runs it, and only it, before a job is queued.
- ``check_model``: what needs the weights and a run (the worker's validate stage). Each file loaded into its
  architecture (NaN/Inf, one forward pass), the task's own model checks with the weights (a classifier's
  compression plan), and the evaluation set. It returns the resolved spec.

Errors are ``KegnetError``s whose messages say what to fix; with several files they name which one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel
from torch import nn

from kegnet.checkpoint import check_checkpoint_file, check_state_keys, open_teacher, resolve_onnx_spec
from kegnet.cost import JobCost, Profile, Profiled, check_cost
from kegnet.errors import KegnetError, SpecError
from kegnet.evaluation import DEFAULT_MAX_SAMPLES, read_eval_set
from kegnet.file_safety import declared_tensors
from kegnet.models.registry import DEFAULT_MAX_PARAMETERS, build_on_meta, model_size, refuse_above
from kegnet.spec import ModelSpec
from kegnet.tasks import get_task, task_for


@dataclass(frozen=True)
class Limits:
    """What a job may ask for. ``None``: no limit (a local run)."""

    max_parameters: int | None = DEFAULT_MAX_PARAMETERS
    max_bytes: int | None = None  # what each file may declare (default: its own size)
    max_memory_bytes: int | None = None
    max_macs: int | None = None
    max_eval_samples: int = DEFAULT_MAX_SAMPLES


@contextlib.contextmanager
def naming(what: str) -> Iterator[None]:
    """Prefix a ``KegnetError`` raised inside with ``what`` (which file it concerns), keeping its type."""
    try:
        yield
    except KegnetError as exc:
        if not what:
            raise
        raise type(exc)(f"{what}{exc}") from exc


def file_label(index: int, count: int) -> str:
    """How an error names the ``index``-th of ``count`` teacher files (nothing when there is one)."""
    return "" if count == 1 else f"checkpoint {index + 1} of {count} (index {index}): "


def check_static(paths: Sequence[Path], spec: ModelSpec, config: BaseModel, limits: Limits, *,
                 has_eval_set: bool = False, eval_set: Path | None = None) -> tuple[ModelSpec, JobCost]:
    """The checks that never run the model (see the module docstring). Returns the resolved spec (an ONNX
    graph fills in input shape and classes) and the job's estimated cost, within ``limits``."""
    task = task_for(spec, config)
    task.check(spec, config, len(paths), has_eval_set or eval_set is not None)
    if spec.arch == "onnx":
        resolved, model = _static_onnx(paths, spec, limits)
    else:
        resolved, model = spec, _static_architecture(paths, spec, limits)
        task.check_structure(model, resolved, config)
    cost = estimate(model, resolved, config, len(paths), limits)
    if eval_set is not None:
        with naming("eval_set: "):
            read_eval_set(eval_set, resolved, limits.max_eval_samples)
    return resolved, cost


def _static_architecture(paths: Sequence[Path], spec: ModelSpec, limits: Limits) -> nn.Module:
    """Each file's structure, the architecture built on the meta device and counted (parameters and buffers),
    and each file's declared keys and shapes against it. Returns the meta model."""
    for i, path in enumerate(paths):
        with naming(file_label(i, len(paths))):
            check_checkpoint_file(path, max_bytes=limits.max_bytes)
    model = build_on_meta(spec.arch, **spec.model_arguments(), **spec.kwargs())
    if limits.max_parameters is not None:
        parameters, buffers = model_size(model)
        refuse_above(spec.arch, parameters, limits.max_parameters, buffers)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for i, path in enumerate(paths):
        with naming(file_label(i, len(paths))):
            check_state_keys(spec, expected, {k: shape for k, (shape, _) in declared_tensors(path).items()})
    return model


def _static_onnx(paths: Sequence[Path], spec: ModelSpec, limits: Limits) -> tuple[ModelSpec, nn.Module]:
    """Each graph read and priced statically (kegnet.models.onnx_graph.static_profile), its spec resolved;
    the job is priced with the largest of the graphs' profiles (a ``Profiled`` stand-in)."""
    from kegnet.models.onnx_graph import OnnxLimits, static_profile

    onnx_limits = OnnxLimits() if limits.max_bytes is None else OnnxLimits(
        max_bytes=limits.max_bytes, max_initializer_bytes=limits.max_bytes)
    resolved, profiles = spec, []
    for i, path in enumerate(paths):
        with naming(file_label(i, len(paths))):
            if spec.arch_kwargs:  # before the graph is read
                raise SpecError("an onnx architecture takes no arch_kwargs: everything is in the graph")
            (declared, classes), profile = static_profile(path, onnx_limits, spec.input_shape)
            resolved = resolve_onnx_spec(spec, declared, classes)
            if profile is None:  # resolved from the spec's input shape: price the graph on it
                _, profile = static_profile(path, onnx_limits, resolved.input_shape)
            assert profile is not None
            if limits.max_parameters is not None and profile.parameters > limits.max_parameters:
                raise SpecError(f"the ONNX graph has {profile.parameters:,} parameters, above this service's "
                                f"limit of {limits.max_parameters:,}")
            profiles.append(profile)
    largest = Profile(*(max(getattr(p, f) for p in profiles) for f in ("parameters", "macs", "activations")))
    return resolved, Profiled(largest)


def check_model(paths: Sequence[Path], spec: ModelSpec, config: BaseModel, limits: Limits, *,
                eval_set: Path | None = None, check_plan: bool = True) -> ModelSpec:
    """The checks that load and run the teacher (see the module docstring); the job is priced by
    ``check_static``. Returns the resolved spec. ``check_plan=False`` leaves out the task's checks on the
    weights (a classifier's plan: EVBMF on every layer), for a caller whose job makes that plan itself next."""
    task = task_for(spec, config)
    resolved = spec
    for i, path in enumerate(paths):
        with naming(file_label(i, len(paths))):
            teacher = open_teacher(path, spec, max_parameters=limits.max_parameters, max_bytes=limits.max_bytes)
        if i == 0 and check_plan:  # every teacher has this spec: the first one is checked against the config
            resolved = teacher.spec
            with naming(file_label(i, len(paths))):
                task.check_model(teacher.model, resolved, config)
        del teacher
    if eval_set is not None:
        with naming("eval_set: "):
            read_eval_set(eval_set, resolved, limits.max_eval_samples)
    return resolved


def estimate(model: nn.Module, spec: ModelSpec, config: BaseModel, teachers: int, limits: Limits) -> JobCost:
    """The one cost entry point: the task's formula on the teacher (built on the meta device, or a
    ``kegnet.cost.Profiled`` stand-in), refused over the limits."""
    cost = get_task(spec.task).cost(model, spec, config, teachers)
    check_cost(cost, max_memory_bytes=limits.max_memory_bytes or cost.memory_bytes,
               max_macs=limits.max_macs or cost.macs)
    return cost
