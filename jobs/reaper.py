"""Declares jobs lost when their worker stopped beating, so nothing stays ``running`` forever.

Delivery semantics: the worker acknowledges a task as soon as it receives it (early ack), so Redis never
re-delivers a long job (no double runs after the visibility timeout). The price: if the worker process
dies mid-job, the message is gone. The running task writes a heartbeat into the job every few seconds;
``reap_once`` fails any running job whose heartbeat is older than ``heartbeat_stale_s`` with "worker lost;
resubmit", and any job queued for longer than ``queued_stale_s`` (its message was lost). The API runs it once
at start-up and then every ``reaper_interval_s`` (service/app.py). Finished results live on disk + Redis.
"""

from __future__ import annotations

import logging

from jobs.settings import Settings
from jobs.store import CANCELLED, CANCELLING, FAILED, QUEUED, RUNNING, JobStore, now

log = logging.getLogger(__name__)

LOST = "worker lost; resubmit the job"


def reap_once(store: JobStore, settings: Settings) -> list[str]:
    """One pass over the active jobs; returns the ids it ended."""
    ended = []
    t = now()
    for job_id in store.active_ids():
        job = store.get(job_id)
        if job is None:
            continue
        status = job["status"]
        last = max(job["heartbeat"] or 0.0, job["started_at"] or 0.0)
        if status in (RUNNING, CANCELLING) and t - last > settings.heartbeat_stale_s:
            if status == CANCELLING:
                done = store.transition(job_id, CANCELLED, {CANCELLING}, event={"message": LOST})
            else:
                done = store.transition(job_id, FAILED, {RUNNING}, error=LOST, event={"message": LOST})
            if done:
                log.warning("job %s: no heartbeat for %.0f s, marked %s", job_id, t - last, status)
                ended.append(job_id)
        elif status == QUEUED and t - (job["created_at"] or t) > settings.queued_stale_s:
            msg = "the job was never picked up by a worker; resubmit it"
            if store.transition(job_id, FAILED, {QUEUED}, error=msg, event={"message": msg}):
                ended.append(job_id)
    return ended

