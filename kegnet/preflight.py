"""Checks a job before it runs: the one validation path shared by the API and the pipeline.

Two parts:

- ``check_static``: what never runs the model. The task's rules (kegnet.tasks: how many teachers, whether an
  evaluation set applies), each file's structure (kegnet.file_safety via ``check_checkpoint_file``: sizes,
  counts, no code), and the architecture's size counted on the meta device. Cheap and bounded: the API runs
  it before a job is queued.
- ``check_model``: what needs the built teacher. Each file loaded into its architecture (keys, shapes, one
  forward pass), the job's cost from the teacher's profile (kegnet.cost), the task's own model checks (a
  classifier's compression plan names its layers; a sequence student's depth fits), and the evaluation set.
  It returns the resolved spec (an ONNX graph fills in input shape and classes).

Errors are ``KegnetError``s whose messages say what to fix; with several files they name which one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from kegnet.checkpoint import check_checkpoint_file, open_teacher
from kegnet.cost import JobCost, check_cost
from kegnet.errors import KegnetError
from kegnet.evaluation import DEFAULT_MAX_SAMPLES, read_eval_set
from kegnet.models.registry import DEFAULT_MAX_PARAMETERS, count_model_parameters, refuse_above
from kegnet.spec import ModelSpec
from kegnet.tasks import get_task


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
                 has_eval_set: bool = False) -> None:
    """The checks that never run the model (see the module docstring)."""
    get_task(spec.task).check(spec, config, len(paths), has_eval_set)
    if spec.arch == "onnx":  # the graph's structure is bounded as it is read (kegnet.models.onnx_graph)
        return
    for i, path in enumerate(paths):
        with naming(file_label(i, len(paths))):
            check_checkpoint_file(path, max_bytes=limits.max_bytes)
    if limits.max_parameters is not None:
        count = count_model_parameters(spec.arch, **spec.model_arguments(), **spec.kwargs())
        refuse_above(spec.arch, count, limits.max_parameters)


def check_model(paths: Sequence[Path], spec: ModelSpec, config: BaseModel, limits: Limits, *,
                eval_set: Path | None = None) -> tuple[ModelSpec, JobCost]:
    """The checks that build and run the teacher (see the module docstring). Returns the resolved spec and
    the job's estimated cost."""
    task = get_task(spec.task)
    resolved, cost = spec, None
    for i, path in enumerate(paths):
        with naming(file_label(i, len(paths))):
            teacher = open_teacher(path, spec, max_parameters=limits.max_parameters, max_bytes=limits.max_bytes)
        if i == 0:  # every teacher has this spec: the first one is checked against the config, and prices the job
            resolved = teacher.spec
            with naming(file_label(i, len(paths))):
                task.check_model(teacher.model, resolved, config)
            cost = estimate(teacher.model, resolved, config, len(paths), limits)
        del teacher
    if eval_set is not None:
        with naming("eval_set: "):
            read_eval_set(eval_set, resolved, limits.max_eval_samples)
    assert cost is not None
    return resolved, cost


def estimate(model: object, spec: ModelSpec, config: BaseModel, teachers: int, limits: Limits) -> JobCost:
    """The one cost entry point: the task's formula on the built teacher, refused over the limits."""
    cost = get_task(spec.task).cost(model, spec, config, teachers)  # type: ignore[arg-type]
    check_cost(cost, max_memory_bytes=limits.max_memory_bytes or cost.memory_bytes,
               max_macs=limits.max_macs or cost.macs)
    return cost
