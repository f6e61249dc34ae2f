"""Progress events emitted by the pipeline; the worker forwards them to the service unchanged."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, Field

from kegnet.errors import Cancelled

# A stage and its share of the whole job, used to turn a stage's own fraction into an overall one. Each task
# names its stages (kegnet.tasks); "done" ends every job.
StageWeights = Sequence[tuple[str, float]]


class ProgressEvent(BaseModel):
    """One progress report. ``progress`` is the whole job's fraction in [0, 1]."""

    stage: str = Field(description="the task's stage (kegnet.tasks), or done")
    stage_progress: float = Field(ge=0.0, le=1.0)
    progress: float = Field(ge=0.0, le=1.0)
    message: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)
    step: int | None = Field(None, description="steps done, in stages that count them (training stages)")
    total: int | None = Field(None, description="steps the stage will take")
    skipped: bool = Field(False, description="the stage has nothing to do in this job (e.g. no generators)")
    time: float = Field(default_factory=time.time)


ProgressCallback = Callable[[ProgressEvent], None]
CancelCheck = Callable[[], bool]


def overall_progress(stages: StageWeights, stage: str, stage_fraction: float) -> float:
    """Map a fraction of one of ``stages`` onto the fraction of the whole job."""
    if stage == "done":
        return 1.0
    names = [name for name, _ in stages]
    done = sum(weight for _, weight in stages[: names.index(stage)])
    total = sum(weight for _, weight in stages)
    return min(1.0, (done + stages[names.index(stage)][1] * min(max(stage_fraction, 0.0), 1.0)) / total)


class Reporter:
    """Turns stage-local progress into ``ProgressEvent``s and enforces cancellation: ``report(stage, fraction,
    message, **metrics)`` emits one event and raises ``Cancelled`` when the job was asked to stop."""

    def __init__(self, progress: ProgressCallback | None, should_cancel: CancelCheck | None,
                 stages: StageWeights) -> None:
        self.progress, self.should_cancel, self.stages = progress, should_cancel, list(stages)

    def __call__(self, stage: str, fraction: float, message: str = "", *, step: int | None = None,
                 total: int | None = None, skipped: bool = False, **metrics: Any) -> None:
        if self.progress:
            self.progress(ProgressEvent(stage=stage, stage_progress=min(max(fraction, 0.0), 1.0),
                                        progress=overall_progress(self.stages, stage, fraction), message=message,
                                        metrics=metrics, step=step, total=total, skipped=skipped))
        self.check()

    def done(self, **metrics: Any) -> None:
        """The job's last event (stage ``done``); no cancellation check: the work is finished."""
        if self.progress:
            self.progress(ProgressEvent(stage="done", stage_progress=1.0, progress=1.0, message="done",
                                        metrics=metrics))

    def check(self) -> None:
        if self.should_cancel and self.should_cancel():
            raise Cancelled("cancelled by request")
