"""``compress_job(job_id, credential)``: run the KegNet pipeline for one stored job and record the outcome in Redis.

The job's files come from ``worker.files``: the API's storage directory on this host, or, with
``KEGNET_API_URL`` set, downloaded from the API and uploaded back with the job's worker credential."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import redis
from billiard.exceptions import WorkerLostError
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.signals import task_failure

from jobs.queue import ARTIFACT_NAMES, TASK_NAME
from jobs.schemas import JobRequest
from jobs.settings import Settings, get_settings
from jobs.store import CANCELLED, CANCELLING, FAILED, QUEUED, RUNNING, SUCCEEDED, JobStore
from kegnet.artifacts import MANIFEST
from kegnet.errors import Cancelled, KegnetError
from kegnet.hashing import sha256_file
from kegnet.isolation import Isolation
from kegnet.pipeline import resolve_device
from kegnet.report import RunReport
from worker.celery_app import app
from worker.files import JobFiles, job_files
from worker.transfer import TransferError

log = logging.getLogger(__name__)

# How long the final status write waits for Redis to come back (a restart) before giving up; the result
# files are with the API by then, so waiting is far cheaper than redoing the job.
FINAL_WRITE_PATIENCE_S = 300.0


def _until_redis_answers(write: Any, *args: Any, patience_s: float = FINAL_WRITE_PATIENCE_S, **kwargs: Any) -> Any:
    """Call ``write`` again while Redis is unreachable, up to ``patience_s``; then let the error go."""
    deadline = time.monotonic() + patience_s
    delay = 0.5
    while True:
        try:
            return write(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > deadline:
                raise
            log.warning("redis unreachable while recording a job's outcome; retrying in %.1f s", delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


class _Heartbeat:
    """Beats into the job from a thread, so long steps without progress events do not look like a death."""

    def __init__(self, store: JobStore, job_id: str, interval: float) -> None:
        self.store, self.job_id, self.interval = store, job_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id[:8]}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.store.heartbeat(self.job_id)
            except Exception:
                log.warning("job heartbeat failed", exc_info=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


class _Reporter:
    """Turns pipeline events into Redis writes, throttled (stage changes and the last event always go)."""

    def __init__(self, store: JobStore, job_id: str, settings: Settings) -> None:
        self.store, self.job_id = store, job_id
        self.interval = settings.progress_write_interval_s
        self._last_write = 0.0
        self._last_stage: str | None = None
        self._last_cancel_check = 0.0
        self._cancel = False
        self.metrics: dict[str, Any] = {}

    def progress(self, event: Any) -> None:
        self.metrics.update(event.metrics or {})
        now = time.monotonic()
        if event.stage == self._last_stage and now - self._last_write < self.interval and event.stage_progress < 1:
            return
        self._last_write, self._last_stage = now, event.stage
        # A progress write lost to a Redis restart is not worth failing a GPU job for: the next one catches up.
        try:
            self.store.update_running(self.job_id, stage=event.stage, progress=f"{event.progress:.4f}",
                                      metrics=self.metrics, heartbeat=repr(time.time()))
            self.store.add_event(self.job_id, {"type": "progress", **event.model_dump(mode="json")})
        except (redis.ConnectionError, redis.TimeoutError):
            log.warning("job %s: progress not recorded, redis unreachable", self.job_id)

    def should_cancel(self) -> bool:
        # Read the flag at most twice a second: the pipeline may ask every step.
        now = time.monotonic()
        if not self._cancel and now - self._last_cancel_check >= 0.5:
            self._last_cancel_check = now
            try:
                self._cancel = self.store.cancel_requested(self.job_id)
            except (redis.ConnectionError, redis.TimeoutError):
                log.warning("job %s: cancel flag unreadable, redis unreachable; going on", self.job_id)
        return self._cancel


def list_artifacts(out_dir: Path, report: RunReport) -> dict[str, dict[str, Any]]:
    """The job's files as its report recorded them (the report hashed each one), and the report itself."""
    files = {name: {"size": f.bytes, "sha256": f.sha256} for name, f in report.files.items()
             if name in ARTIFACT_NAMES}
    manifest = out_dir / MANIFEST
    return {**files, MANIFEST: {"size": manifest.stat().st_size, "sha256": sha256_file(manifest)}}


def run_job(job_id: str, store: JobStore, files: JobFiles, settings: Settings) -> str:
    """The task's body, separate from Celery so it can be tested directly. Returns the final status."""
    job = store.get(job_id)
    if job is None:
        log.warning("job %s not found (deleted?); skipping", job_id)
        return "missing"
    if not store.transition(job_id, RUNNING, {QUEUED}, started_at=repr(time.time()), heartbeat=repr(time.time()),
                            stage="validate", worker=f"{socket.gethostname()}:{os.getpid()}"):
        log.info("job %s is %s, not queued; skipping", job_id, job["status"])
        return job["status"]
    log.info("job %s started on %s", job_id, socket.gethostname())

    reporter = _Reporter(store, job_id, settings)
    try:
        with _Heartbeat(store, job_id, settings.heartbeat_interval_s):
            request = JobRequest.model_validate(job["request"])
            device = str(resolve_device(request.device))
            if settings.torch_threads:
                import torch

                torch.set_num_threads(settings.torch_threads)
            from kegnet.pipeline import run_pipeline  # heavy; imported in the child only

            with files.workspace(job) as ws:
                result = run_pipeline(
                    ws.checkpoints[0] if len(ws.checkpoints) == 1 else ws.checkpoints, request.model,
                    request.config, ws.out_dir, device=device, seed=request.seed, progress=reporter.progress,
                    should_cancel=reporter.should_cancel, max_parameters=settings.max_parameters,
                    max_bytes=settings.max_upload_bytes,  # the API's budget, applied again to the stored files
                    # Labelled data the user sent (validated by the API): real accuracy in the report, never
                    # trained on.
                    eval_set=ws.eval_set, max_eval_samples=settings.max_eval_samples,
                    # The upload runs first in a limited child process (the validate stage): the API never ran it.
                    isolation=Isolation(settings.validate_memory_bytes, settings.validate_timeout_s),
                    # Raised into the task by Celery; the pipeline's optional steps must not swallow it.
                    interrupts=(SoftTimeLimitExceeded,),
                )
                artifacts = list_artifacts(Path(result.out_dir), result.report)
                metrics = {**reporter.metrics, **result.report.summary(), "device": device}
                if files.uploads:  # shown while the artifacts travel; not worth failing the job over
                    with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                        store.update_running(job_id, stage="upload", heartbeat=repr(time.time()))
                files.publish(ws, artifacts)
        done = _until_redis_answers(store.transition, job_id, SUCCEEDED, {RUNNING, CANCELLING}, stage="done",
                                    progress="1", artifacts=artifacts, metrics=metrics)
        return SUCCEEDED if done else (store.get(job_id) or {}).get("status", "missing")
    except Cancelled:
        _until_redis_answers(store.transition, job_id, CANCELLED, {RUNNING, CANCELLING},
                             event={"message": "cancelled by the user"})
        return CANCELLED
    except KegnetError as exc:
        return _fail(store, job_id, str(exc))
    except TransferError as exc:
        log.warning("job %s: %s", job_id, exc)
        return _fail(store, job_id, f"the job's files could not be moved between this worker and the API: {exc}; "
                                    "resubmit the job")
    except SoftTimeLimitExceeded:
        return _fail(store, job_id, f"the job ran past the time limit of {settings.soft_time_limit_s} s; "
                                    "lower the generator/distillation steps or batch size and resubmit")
    except Exception:
        log.exception("job %s crashed", job_id)
        return _fail(store, job_id, "internal error while compressing; the operators have the details in the "
                                    "worker log")


def _fail(store: JobStore, job_id: str, message: str) -> str:
    _until_redis_answers(store.transition, job_id, FAILED, {RUNNING, CANCELLING}, error=message,
                         event={"message": message})
    return FAILED


@app.task(name=TASK_NAME, bind=True)
def compress_job(self: Any, job_id: str, credential: str | None = None) -> str:
    """``credential``: the job's worker credential (jobs/credentials.py), sent when the API has a worker secret;
    only a worker with ``KEGNET_API_URL`` uses it."""
    settings = get_settings()
    store = JobStore.from_url(settings.redis_url, settings.key_prefix, settings.max_events_per_job)
    status = run_job(job_id, store, job_files(settings, credential), settings)
    log.info("job %s finished: %s", job_id, status)
    return status


_parent_store: JobStore | None = None


@task_failure.connect
def _record_parent_side_failure(sender: Any = None, exception: BaseException | None = None,
                                args: Any = None, **_: Any) -> None:
    """Failures seen by the worker's parent: the child was killed (OOM, SIGKILL) or hit the hard time limit.

    ``run_job`` handles every error raised inside the child, so this only fires when the child could not
    record anything itself. The reaper would catch these jobs too, later and with a vaguer message.
    """
    global _parent_store
    if getattr(sender, "name", None) != compress_job.name or not args:
        return
    settings = get_settings()
    if isinstance(exception, TimeLimitExceeded):
        msg = (f"the job was stopped at the hard time limit of {settings.hard_time_limit_s} s; "
               "lower the generator/distillation steps and resubmit")
    elif isinstance(exception, WorkerLostError):
        msg = "worker lost: the process running the job died (for example out of memory); resubmit the job"
    else:
        msg = "internal error while compressing; the operators have the details in the worker log"
    try:
        _parent_store = _parent_store or JobStore.from_url(settings.redis_url, settings.key_prefix)
        job_id = str(args[0])
        _parent_store.transition(job_id, FAILED, {QUEUED, RUNNING}, error=msg, event={"message": msg})
        _parent_store.transition(job_id, CANCELLED, {CANCELLING}, event={"message": msg})
        log.warning("job %s: %s (%r)", job_id, msg, exception)
    except Exception:
        log.exception("could not record the failure of job %s", args[0])
