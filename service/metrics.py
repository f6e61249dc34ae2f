"""``GET /metrics``: Prometheus text format, from a ``CollectorRegistry`` of this app (tests build several apps).

Everything about jobs is read from the job store when Prometheus scrapes, not observed in this process: the
worker, not the API, records a job's transitions, so an API-side observation would miss them (or need the
worker to push), and figures counted in memory would reset with every restart and differ between replicas.
Computed from the store, every replica answers the same totals and a restart loses nothing. The job and stage
duration histograms are therefore built on each scrape from the finished jobs still in the store (a deleted
job leaves them). Stage durations come from each succeeded job's ``manifest.json`` (``timings_s``), read once
per job and cached: a manifest never changes once written.

The one figure only the API sees, uploads it refused, is a Counter incremented by ``RefusalCounter``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobs.queue import QUEUE
from jobs.settings import Settings
from jobs.storage import LocalStorage
from jobs.store import ACTIVE, TERMINAL, JobStore
from kegnet.artifacts import MANIFEST

log = logging.getLogger(__name__)

STATES = sorted(ACTIVE | TERMINAL)
JOB_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
STAGE_BUCKETS = (0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)
REFUSED_STATUSES = {413, 422, 429}
_JOB_KEY = re.compile(r":job:([0-9a-f]{32})$")


def _histogram(name: str, doc: str, label: str, values: dict[str, list[float]],
               buckets: Iterable[float]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=[label])
    for key, observed in sorted(values.items()):
        counts = [[str(float(b)), sum(1 for v in observed if v <= b)] for b in buckets]
        family.add_metric([key], counts + [["+Inf", len(observed)]], sum_value=sum(observed))
    return family


class StoreCollector(Collector):
    """Jobs by state, job and stage durations, the queue's length and the live workers, read on scrape."""

    def __init__(self, store: JobStore, storage: LocalStorage, settings: Settings) -> None:
        self.store, self.storage, self.settings = store, storage, settings
        self._timings: dict[str, dict[str, float]] = {}  # job id -> its manifest's timings_s (immutable)
        self._broker: redis.Redis | None = None

    def _jobs(self) -> list[tuple[str, list[Any]]]:
        ids = [m.group(1) for key in self.store.r.scan_iter(match=f"{self.store.p}:job:*", count=1000)
               if (m := _JOB_KEY.search(key if isinstance(key, str) else key.decode()))]
        pipe = self.store.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(f"{self.store.p}:job:{job_id}", "status", "created_at", "started_at", "finished_at")
        return list(zip(ids, pipe.execute(), strict=True))

    def _stage_timings(self, job_id: str) -> dict[str, float]:
        if job_id not in self._timings:
            try:
                manifest = json.loads((self.storage.out_dir(job_id) / MANIFEST).read_text())
                self._timings[job_id] = {k: float(v) for k, v in (manifest.get("timings_s") or {}).items()}
            except (OSError, ValueError):  # not written (yet), or not readable: try again next scrape
                return {}
        return self._timings[job_id]

    def _queue_length(self) -> int | None:
        try:
            if self._broker is None:
                self._broker = redis.Redis.from_url(self.settings.celery_broker_url, socket_timeout=2)
            return int(self._broker.llen(QUEUE))
        except redis.RedisError:
            log.warning("metrics: the broker's queue length could not be read", exc_info=True)
            return None

    def collect(self) -> Iterator[Metric]:
        jobs = self._jobs()
        by_state = dict.fromkeys(STATES, 0)
        durations: dict[str, list[float]] = {}
        stages: dict[str, list[float]] = {}
        for job_id, (status, created, started, finished) in jobs:
            by_state[status] = by_state.get(status, 0) + 1
            if status in TERMINAL and finished:
                durations.setdefault(status, []).append(float(finished) - float(started or created or finished))
            if status == "succeeded":
                for stage, seconds in self._stage_timings(job_id).items():
                    stages.setdefault(stage, []).append(seconds)
        self._timings = {k: v for k, v in self._timings.items() if k in {j for j, _ in jobs}}
        gauge = GaugeMetricFamily("kegnet_jobs", "jobs in the store, by state", labels=["state"])
        for state, count in sorted(by_state.items()):
            gauge.add_metric([state], count)
        yield gauge
        yield _histogram("kegnet_job_duration_seconds", "finished jobs' run time (started to finished), by "
                         "final state", "state", durations, JOB_BUCKETS)
        yield _histogram("kegnet_stage_duration_seconds", "succeeded jobs' stage times (manifest timings_s)",
                         "stage", stages, STAGE_BUCKETS)
        length = self._queue_length()
        if length is not None:
            yield GaugeMetricFamily("kegnet_queue_length", f"messages waiting in the broker's {QUEUE!r} queue",
                                    value=length)
        workers = self.store.live_workers(within_s=3 * self.settings.heartbeat_interval_s + 5)
        yield GaugeMetricFamily("kegnet_live_workers", "workers whose heartbeat is recent", value=len(workers))
        yield GaugeMetricFamily("kegnet_metrics_scrape_timestamp_seconds", "when these figures were read",
                                value=time.time())


def make_registry(store: JobStore, storage: LocalStorage, settings: Settings) -> tuple[CollectorRegistry, Counter]:
    """A registry of this app's own (never the process-global one) and its refused-uploads Counter."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store, storage, settings))
    refused = Counter("kegnet_uploads_refused", "job submissions (POST /v1/jobs) refused, by HTTP status",
                      ["status"], registry=registry)
    for status in sorted(REFUSED_STATUSES):
        refused.labels(str(status))  # every series exists from the start, at 0
    return registry, refused


class RefusalCounter:
    """ASGI middleware, outermost, so it also sees the 413 the body-size middleware answers before routing:
    counts POST /v1/jobs answered 413, 422 or 429."""

    def __init__(self, app: ASGIApp, counter: Counter) -> None:
        self.app, self.counter = app, counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/") != "/v1/jobs":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] in REFUSED_STATUSES:
                self.counter.labels(str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
