"""Kinds of job, one module each: ``classify`` (kegnet/tasks/classify.py) and ``sequence``
(kegnet/tasks/sequence.py). ``get_task(spec.task)`` is the only place a job's kind is looked up; the driver
(kegnet/pipeline.py), the preflight (kegnet/preflight.py) and the student loader ask the task, never branch."""

from __future__ import annotations

import importlib

from kegnet.errors import KegnetError
from kegnet.spec import ModelSpec
from kegnet.tasks.base import Inputs, Run, Stage, Task, TaskOutcome

_MODULES = {"classify": "kegnet.tasks.classify", "sequence": "kegnet.tasks.sequence"}


def get_task(name: str) -> Task:
    """The ``Task`` of ``name`` (a ``ModelSpec.task``); imported on first use (each pulls in its stages)."""
    if name not in _MODULES:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name]).TASK


def load_all() -> list[Task]:
    """Every task, imported now: a server calls this once at start-up, so that its first request does not
    pay (in time and resident memory) for the imports of the tasks' stages."""
    return [get_task(name) for name in _MODULES]


def task_for(spec: ModelSpec, config: object) -> Task:
    """The spec's task, once ``config`` is that task's config (kegnet.config.TASK_CONFIGS)."""
    task = get_task(spec.task)
    if getattr(config, "task", None) != spec.task:
        raise KegnetError(f"a {spec.task} job needs the {spec.task} config (kegnet.config.config_for), got "
                          f"{type(config).__name__}")
    return task


__all__ = ["Inputs", "Run", "Stage", "Task", "TaskOutcome", "get_task", "load_all", "task_for"]
