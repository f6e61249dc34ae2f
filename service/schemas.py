"""Response bodies of the HTTP API (the request, ``jobs.schemas.JobRequest``, is the job domain's)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class CheckpointInfo(BaseModel):
    sha256: str
    size: int


class ArtifactInfo(BaseModel):
    name: str
    size: int
    sha256: str
    url: str


class JobOut(BaseModel):
    """A job. ``metrics`` holds the progress numbers while it runs and, once it succeeded, the summary of its
    manifest: compression_ratio, parameters, latency, ``recipe`` (the sample recipe kept), ``confidence_estimate``
    (agreement with the teacher on a synthetic exam, 0-1), ``confidence_level`` (high|medium|low),
    ``confidence_warnings``, and with an evaluation set ``eval_samples``, ``eval_teacher_accuracy`` and
    ``eval_student_accuracy``."""

    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelling", "cancelled"]
    stage: str | None = None
    progress: float = 0.0
    metrics: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = None
    checkpoint_sha256: str  # of the first checkpoint file; ``checkpoints`` lists all, in upload order
    checkpoint_size: int
    checkpoints: list[CheckpointInfo] = Field(default_factory=list)
    eval_set: CheckpointInfo | None = None  # the labelled evaluation file, if one was sent (reported only)
    request: dict[str, Any]
    artifacts: list[ArtifactInfo] = Field(default_factory=list)
    links: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def from_job(cls, job: dict[str, Any]) -> JobOut:
        base = f"/v1/jobs/{job['id']}"
        arts = [ArtifactInfo(name=n, size=a["size"], sha256=a["sha256"], url=f"{base}/artifacts/{n}")
                for n, a in sorted(job["artifacts"].items())]
        return cls(
            id=job["id"], status=job["status"], stage=job.get("stage") or None,
            progress=job.get("progress") or 0.0, metrics=job["metrics"], error=job.get("error") or None,
            created_at=job["created_at"], started_at=job["started_at"], finished_at=job["finished_at"],
            updated_at=job["updated_at"], checkpoint_sha256=job["checkpoint_sha256"],
            checkpoint_size=job["checkpoint_size"], checkpoints=job.get("checkpoints") or [],
            eval_set=job.get("eval_set"), request=job["request"], artifacts=arts,
            links={"self": base, "events": f"{base}/events", "cancel": f"{base}/cancel",
                   "artifacts": f"{base}/artifacts"},
        )


class JobPage(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = None


class EventPage(BaseModel):
    events: list[dict[str, Any]]
    next_after: int
    status: str
