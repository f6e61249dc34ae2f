"""The task seam: what a kind of job (classifier, sequence model, ...) gives the one pipeline driver.

A ``Task`` is a list of stages, each a function of the task's job state, plus the task's static rules, its cost
formula and how to rebuild its student from saved weights. The driver (kegnet.pipeline.run_pipeline) owns what
every job shares: ``Run`` (inputs, device, seed, output folder, events, cancellation and stage times); a task's
job state is a dataclass that extends ``Run`` with the fields its own stages fill in, in stage order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kegnet.events import Reporter
from kegnet.spec import ModelSpec

if TYPE_CHECKING:
    from kegnet.cost import JobCost
    from kegnet.report import ClassifyReport, SequenceReport

TeacherSource = str | Path | nn.Module
EvalSet = str | Path | tuple[torch.Tensor, torch.Tensor]


@dataclass
class Inputs:
    """What the caller gave besides spec and config: the teachers, an optional labelled evaluation set, and the
    bounds on what the files may declare."""

    sources: list[TeacherSource]
    eval_set: EvalSet | None = None
    max_eval_samples: int = 10_000
    max_parameters: int | None = None
    max_bytes: int | None = None
    generators: list[nn.Module] | None = None  # already trained against this teacher (classifiers)


@dataclass
class Run:
    """What the driver owns and every task's stages share. A task's job state extends it."""

    spec: ModelSpec
    config: Any  # the task's config model (kegnet.config.TASK_CONFIGS)
    device: torch.device
    seed: int
    out: Path
    report: Reporter
    inputs: Inputs
    timings: dict[str, float] = field(default_factory=dict)
    student: nn.Module | None = None

    def timed(self, stage: str, fn: Callable[[Any], None]) -> None:
        """Run one stage on this job and record its seconds under ``stage``."""
        t0 = time.perf_counter()
        fn(self)
        self.timings[stage] = time.perf_counter() - t0


@dataclass(frozen=True)
class Stage:
    """One step of a task: its event name, its share of the job's progress, and the function that runs it."""

    name: str
    weight: float
    run: Callable[[Any], None]


@dataclass
class TaskOutcome:
    """What a task hands back after its last stage: its report section and the core figures only it knows."""

    section: ClassifyReport | SequenceReport
    core: dict[str, Any]  # RunReport core fields the task measured (parameters, agreement, speed, ...)
    student: nn.Module
    generators: list[nn.Module] | None = None
    candidates: dict[str, nn.Module] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """A kind of job.

    - ``check(spec, config, teachers, has_eval_set)``: the task's rules that never run a model (the API and
      the pipeline both call it); raises ``KegnetError`` with what to fix.
    - ``check_model(model, spec, config)``: the checks that need the teacher's weights (the plan fits them).
    - ``check_structure(model, spec, config)``: the config against the architecture alone (``model`` built on
      the meta device, no weights): the layers it names exist, the student fits.
    - ``cost(model, spec, config, teachers)``: the job's estimated cost (kegnet.cost.JobCost).
    - ``finish(job)``: after the last stage, the task's report section and core figures.
    - ``rebuild_student(model, metadata)``: a saved student's structure on a freshly built teacher.
    """

    name: str
    job_type: type[Run]
    stages: tuple[Stage, ...]
    check: Callable[[ModelSpec, Any, int, bool], None]
    check_model: Callable[[nn.Module, ModelSpec, Any], None]
    check_structure: Callable[[nn.Module, ModelSpec, Any], None]
    cost: Callable[[nn.Module, ModelSpec, Any, int], JobCost]
    finish: Callable[[Any], TaskOutcome]
    rebuild_student: Callable[[nn.Module, dict[str, str]], nn.Module]

    @property
    def stage_weights(self) -> list[tuple[str, float]]:
        return [(s.name, s.weight) for s in self.stages]

