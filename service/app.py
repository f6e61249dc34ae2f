"""The FastAPI application: ``create_app(settings)``; ``uvicorn service.app:app`` builds one from the env."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from jobs import credentials
from jobs.instances import instance_tag, new_instance_id
from jobs.queue import QUEUE, TASK_NAME
from jobs.reaper import reap_once
from jobs.settings import Settings, get_settings
from jobs.storage import LocalStorage
from jobs.store import JobStore
from jobs.streams import StreamLeases
from kegnet.tasks import load_all
from service.keys import KeyStore
from service.limits import BodySizeLimitMiddleware
from service.metrics import RefusalCounter, make_registry
from service.routers import artifacts, health, internal, jobs, web

log = logging.getLogger(__name__)


def celery_enqueuer(settings: Settings) -> Callable[[str], None]:
    """Send the task by name, so the API never imports the worker (or touches a GPU). With a worker secret
    set, the message also carries the job's worker credential (jobs/credentials.py) for workers on other
    hosts."""
    from celery import Celery

    sender = Celery("kegnet-api", broker=settings.celery_broker_url)
    sender.conf.update(task_serializer="json", accept_content=["json"], broker_connection_retry=False,
                       broker_connection_retry_on_startup=False, broker_connection_timeout=5)

    def enqueue(job_id: str) -> None:
        sender.send_task(TASK_NAME, args=task_args(settings, job_id), queue=QUEUE, ignore_result=True)

    return enqueue


def task_args(settings: Settings, job_id: str) -> list[str]:
    """The task's arguments: the job id, and its worker credential where workers may be remote."""
    if settings.worker_secret is None:
        return [job_id]
    ttl = credentials.lifetime_s(settings.queued_stale_s, settings.hard_time_limit_s)
    return [job_id, credentials.mint(settings.worker_secret.get_secret_value(), job_id, ttl)]


def recover(store: JobStore, storage: LocalStorage) -> None:
    """Let go of what API processes that died (kill -9, OOM) held: their cap slots, their Idempotency-Key claims
    whose job was never created, and their half-written uploads in ``tmp/``. Live replicas' are kept."""
    slots, claims = store.release_dead_instances()
    parts = storage.clear_orphan_uploads(store.instances.live_tags())
    if slots or claims or parts:
        log.warning("released %d slot(s) and %d Idempotency-Key claim(s) of dead API instances; removed %d "
                    "orphaned upload(s)", slots, claims, parts)


async def reaper_loop(store: JobStore, storage: LocalStorage, settings: Settings) -> None:
    """``jobs.reaper.reap_once`` and ``recover`` every ``reaper_interval_s``, off the event loop, for as long as
    the app runs."""
    while True:
        try:
            await asyncio.to_thread(reap_once, store, settings)
            await asyncio.to_thread(recover, store, storage)
        except Exception:  # a Redis hiccup must not kill the loop
            log.exception("reaper pass failed")
        await asyncio.sleep(settings.reaper_interval_s)


async def liveness_loop(store: JobStore, settings: Settings) -> None:
    """Renew this instance's liveness key every ``instance_beat_s``: while it lives, no one releases its slots."""
    while True:
        await asyncio.sleep(settings.instance_beat_s)
        try:
            await asyncio.to_thread(store.instances.beat)
        except Exception:
            log.warning("could not renew this API instance's liveness key", exc_info=True)


async def _start(store: JobStore, storage: LocalStorage, settings: Settings, run_reaper: bool) -> list[asyncio.Task]:
    """Register this instance, then clean up after dead ones (always: a restart must not wait for the reaper
    interval), then start the loops."""
    try:
        await asyncio.to_thread(store.instances.beat)
        await asyncio.to_thread(recover, store, storage)
        if run_reaper:  # jobs whose worker died while this API was down are ended now
            await asyncio.to_thread(reap_once, store, settings)
    except Exception:
        log.exception("start-up recovery failed")
    tasks = [asyncio.create_task(liveness_loop(store, settings))]
    if run_reaper:
        tasks.append(asyncio.create_task(reaper_loop(store, storage, settings)))
    return tasks


def _lifespan(store: JobStore, storage: LocalStorage, settings: Settings, run_reaper: bool) -> Callable:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The upload checks' imports (every task's modules) at start-up, not in the first request.
        await asyncio.to_thread(load_all)
        tasks = await _start(store, storage, settings, run_reaper)
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:  # a clean stop: requests are done, so this instance holds nothing; others need not wait for it
            await asyncio.to_thread(store.instances.forget, store.instance)
        except Exception:
            log.warning("could not deregister this API instance", exc_info=True)

    return lifespan


def create_app(settings: Settings | None = None, enqueue: Callable[[str], None] | None = None,
               run_reaper: bool = True) -> FastAPI:
    settings = settings or get_settings()
    instance = new_instance_id()
    store = JobStore.from_url(settings.redis_url, settings.key_prefix, settings.max_events_per_job,
                              instance=instance, instance_ttl_s=settings.instance_ttl_s)
    storage = LocalStorage(settings.data_dir, tmp_tag=instance_tag(instance))
    lifespan = _lifespan(store, storage, settings, run_reaper)

    app = FastAPI(title="KegNet compression service", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.instance = instance
    app.state.store = store
    app.state.storage = storage
    app.state.streams = StreamLeases(store.r, settings.key_prefix, instance, settings.instance_ttl_s)
    app.state.keys = KeyStore(store.r, settings.key_prefix)
    app.state.enqueue = enqueue or celery_enqueuer(settings)
    app.state.validation_slots = asyncio.Semaphore(settings.max_concurrent_validations)
    # The whole body: every budget together. Each file's own cap is enforced as it is saved (routers/jobs.py).
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_upload_bytes + settings.max_eval_bytes
                       + settings.form_overhead_bytes)
    # Added last, so outermost: it sees the body-size middleware's 413 too.
    app.state.metrics, refused = make_registry(store, storage, settings)
    app.add_middleware(RefusalCounter, counter=refused)

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        # Job state lives in Redis: while it restarts, say so and when to retry instead of a bare 500.
        log.warning("redis unreachable during %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": "the job store is unavailable; retry shortly"}, status_code=503,
                            headers={"Retry-After": str(settings.retry_after_s)})

    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(artifacts.router)
    app.include_router(internal.router)
    app.include_router(web.api)
    app.include_router(web.router)
    app.mount("/static", web.static_files(), name="static")

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        # Unauthenticated like /healthz: counts only, no job ids or owners. Keep it off the public network.
        return Response(generate_latest(app.state.metrics), media_type=CONTENT_TYPE_LATEST)

    if settings.auth_disabled:
        log.warning("authentication is DISABLED (KEGNET_AUTH_DISABLED=true): every caller is the same owner")
    return app


def __getattr__(name: str) -> Any:
    # Module-level ``app`` for ``uvicorn service.app:app``, built on first access so importing this
    # module (tests, tools) does not read the environment or connect to Redis.
    if name == "app":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        globals()["app"] = created = create_app()
        return created
    raise AttributeError(name)
