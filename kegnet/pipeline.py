"""The one pipeline driver: ``run_pipeline`` runs any kind of job, stage by stage.

The job's task (kegnet/tasks: ``classify``, ``sequence``) gives the stages; this driver owns what they share:
the inputs, device and seed, progress events and cancellation (kegnet.events.Reporter), each stage's time,
and the run report (kegnet.report.RunReport, written as ``manifest.json``). It never reads any data: the
teacher is the only input. The CLI, the worker and the bench all call ``run_pipeline``.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import tensorly
import torch
from pydantic import BaseModel
from torch import nn

from kegnet.artifacts import MANIFEST
from kegnet.errors import KegnetError, interrupting
from kegnet.evaluation import DEFAULT_MAX_SAMPLES
from kegnet.events import CancelCheck, ProgressCallback, Reporter
from kegnet.isolation import Isolation, check_model_isolated
from kegnet.models.registry import DEFAULT_MAX_PARAMETERS
from kegnet.preflight import Limits
from kegnet.report import RunReport
from kegnet.spec import ModelSpec
from kegnet.tasks import Inputs, Run, Stage, task_for
from kegnet.tasks.base import EvalSet, TeacherSource

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    out_dir: Path
    report: RunReport
    student: nn.Module
    generators: list[nn.Module] | None = None  # the KegNet generators, reusable for another setting
    candidates: dict[str, nn.Module] = field(default_factory=dict)  # recipe name -> its student (chosen included)

    @property
    def artifacts(self) -> dict[str, Path]:
        return {name: self.out_dir / name for name in [*self.report.files, MANIFEST]}


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present. Called inside the job, never at import (Celery forks workers)."""
    if device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda" if device == "auto" else device)
    if device == "auto":
        return torch.device("cpu")
    raise KegnetError(f"device {device!r} was requested but this machine has no GPU; use 'auto' or 'cpu'")


def run_pipeline(
    checkpoint: TeacherSource | Sequence[TeacherSource], spec: ModelSpec, config: BaseModel,
    out_dir: str | Path, *, device: str = "auto", seed: int = 0, progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None, generators: list[nn.Module] | None = None,
    max_parameters: int | None = DEFAULT_MAX_PARAMETERS, max_bytes: int | None = None,
    eval_set: EvalSet | None = None, max_eval_samples: int = DEFAULT_MAX_SAMPLES,
    isolation: Isolation | None = None, interrupts: tuple[type[BaseException], ...] = (),
) -> RunResult:
    """Compress the teacher in ``checkpoint`` (a file path, or an already built model) into ``out_dir``.

    ``config`` is the config of the spec's task (kegnet.config: ``ClassifierConfig`` or ``SequenceJobConfig``).
    ``checkpoint`` may also be a list of up to ``MAX_TEACHERS`` classifiers of the same ``spec``: a teacher
    ensemble (kegnet/tasks/classify.py). ``spec.arch == "onnx"``: each file is an ONNX graph.

    ``generators``: KegNet generators already trained against this teacher (for example by an earlier run at
    another compression setting); the generator stage is then skipped. ``max_parameters`` refuses larger
    architectures before they are built; ``max_bytes`` bounds what each file may declare (default: its size;
    ``kegnet.checkpoint.open_teacher``). ``eval_set``: the user's labelled data (a safetensors file or
    ``(x, y)``; ``kegnet.evaluation``), used only to report real accuracy. ``isolation``: first run each
    teacher file once in a child process under these limits (the ``validate`` stage, kegnet.isolation): for
    uploads from strangers. ``interrupts``: exceptions the caller raises into the job from outside (a worker's
    soft time limit) that the steps making optional files (int8, ``.pt2``), which otherwise catch every failure
    and keep the job, must let through (kegnet.errors.reraise_interrupts). Raises ``KegnetError`` subclasses for
    bad input (user-facing messages) and ``Cancelled`` on request.
    """
    task = task_for(spec, config)
    sources = [checkpoint] if isinstance(checkpoint, str | Path | nn.Module) else list(checkpoint)
    task.check(spec, config, len(sources), eval_set is not None)  # the same rules the API checks
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    inputs = Inputs(sources, eval_set, max_eval_samples, max_parameters, max_bytes, generators)
    stages = task.stages
    if isolation is not None and all(isinstance(s, str | Path) for s in sources):
        stages = (Stage("validate", 0.02, lambda job: _validate(job, isolation)), *stages)
    job = task.job_type(spec, config, resolve_device(device), seed, out,
                        Reporter(progress, should_cancel, [(s.name, s.weight) for s in stages]), inputs)
    with interrupting(interrupts):
        for stage in stages:
            job.timed(stage.name, stage.run)
        outcome = task.finish(job)
    report = RunReport(task=spec.task, spec=job.spec.model_dump(mode="json"), config=config.model_dump(mode="json"),
                       seed=seed, device=str(job.device), timings_s=job.timings, versions=_versions(),
                       **outcome.core, **{spec.task: outcome.section})
    report.write(out)
    job.report.done(compression_ratio=report.compression_ratio)
    log.info("compressed %s (%s): %.2fx in %.1fs", spec.arch, spec.task, report.compression_ratio,
             sum(job.timings.values()))
    return RunResult(out, report, outcome.student, outcome.generators, outcome.candidates)


def _validate(job: Run, isolation: Isolation) -> None:
    """Every teacher file built and run once in a limited child process (kegnet.isolation), before this
    process loads any: a model that needs too much memory or time fails the job here."""
    n = len(job.inputs.sources)
    job.report("validate", 0.0, f"checking the teacher{'s' if n > 1 else ''} in a limited process")
    limits = Limits(max_parameters=job.inputs.max_parameters, max_bytes=job.inputs.max_bytes,
                    max_eval_samples=job.inputs.max_eval_samples)
    eval_set = job.inputs.eval_set if isinstance(job.inputs.eval_set, str | Path) else None
    job.spec = check_model_isolated([Path(p) for p in job.inputs.sources], job.spec, job.config, limits,  # type: ignore[arg-type]
                                    isolation, eval_set=Path(eval_set) if eval_set else None,
                                    should_cancel=job.report.should_cancel)
    job.report("validate", 1.0, f"teacher{'s' if n > 1 else ''} checked")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        kegnet = version("kegnet")
    except PackageNotFoundError:
        kegnet = "0+unknown"
    return {"kegnet": kegnet, "torch": torch.__version__, "tensorly": tensorly.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


__all__ = ["RunResult", "resolve_device", "run_pipeline"]
