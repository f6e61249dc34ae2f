"""The Celery application: ``celery -A worker.celery_app:app worker -P prefork -c 1 -Q gpu``.

Delivery semantics: tasks are acknowledged early (``task_acks_late=False``) and nothing is prefetched, so a
long job is never re-delivered by Redis after ``visibility_timeout`` and never waits reserved behind another.
If the process running a job dies, the job's heartbeat stops and the API's reaper fails it ("worker lost;
resubmit"): at most once, and never ``running`` forever. Each task gets a fresh child process
(``max_tasks_per_child=1``) so GPU memory is returned; CUDA is never touched in this parent process.
"""

from __future__ import annotations

import logging
import socket
import threading

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from jobs.queue import QUEUE, TASK_NAME
from jobs.settings import get_settings
from jobs.store import JobStore

log = logging.getLogger(__name__)

settings = get_settings()

app = Celery("kegnet", broker=settings.celery_broker_url, include=["worker.tasks"])
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    task_ignore_result=True,  # job state lives in our own Redis keys
    task_default_queue=QUEUE,
    task_routes={TASK_NAME: {"queue": QUEUE}},
    task_acks_late=False,
    task_reject_on_worker_lost=False,
    worker_prefetch_multiplier=1,
    worker_disable_prefetch=True,  # Celery >= 5.6: do not reserve a second message while busy
    worker_max_tasks_per_child=1,
    worker_concurrency=1,
    task_soft_time_limit=settings.soft_time_limit_s,
    task_time_limit=settings.hard_time_limit_s,
    # Irrelevant with early acks, but keep it above the hard limit in case someone turns late acks on.
    broker_transport_options={"visibility_timeout": settings.hard_time_limit_s + 600},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_stop = threading.Event()


def _beat(name: str) -> None:
    # Runs in the parent: only Redis I/O, no torch. /readyz reads these beats.
    store = JobStore.from_url(settings.redis_url, settings.key_prefix)
    while not _stop.is_set():
        try:
            store.worker_heartbeat(name)
        except Exception:
            log.warning("worker heartbeat failed", exc_info=True)
        _stop.wait(settings.heartbeat_interval_s)


@worker_ready.connect
def _start_heartbeat(sender: object = None, **_: object) -> None:
    name = getattr(sender, "hostname", None) or f"celery@{socket.gethostname()}"
    threading.Thread(target=_beat, args=(name,), name="kegnet-worker-heartbeat", daemon=True).start()


@worker_shutdown.connect
def _stop_heartbeat(**_: object) -> None:
    _stop.set()
