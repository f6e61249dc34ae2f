"""The FastAPI application: ``create_app(settings)``; ``uvicorn service.app:app`` builds one from the env."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from jobs.queue import QUEUE, TASK_NAME
from jobs.reaper import reap_once
from jobs.settings import Settings, get_settings
from jobs.storage import LocalStorage
from jobs.store import JobStore
from service.keys import KeyStore
from service.limits import BodySizeLimitMiddleware
from service.routers import artifacts, health, jobs

log = logging.getLogger(__name__)


def celery_enqueuer(settings: Settings) -> Callable[[str], None]:
    """Send the task by name, so the API never imports the worker (or touches a GPU)."""
    from celery import Celery

    sender = Celery("kegnet-api", broker=settings.celery_broker_url)
    sender.conf.update(task_serializer="json", accept_content=["json"], broker_connection_retry=False,
                       broker_connection_retry_on_startup=False, broker_connection_timeout=5)

    def enqueue(job_id: str) -> None:
        sender.send_task(TASK_NAME, args=[job_id], queue=QUEUE, ignore_result=True)

    return enqueue


async def reaper_loop(store: JobStore, settings: Settings) -> None:
    """``jobs.reaper.reap_once`` every ``reaper_interval_s``, off the event loop, for as long as the app runs."""
    while True:
        try:
            await asyncio.to_thread(reap_once, store, settings)
        except Exception:  # a Redis hiccup must not kill the loop
            log.exception("reaper pass failed")
        await asyncio.sleep(settings.reaper_interval_s)


def create_app(settings: Settings | None = None, enqueue: Callable[[str], None] | None = None,
               run_reaper: bool = True) -> FastAPI:
    settings = settings or get_settings()
    store = JobStore.from_url(settings.redis_url, settings.key_prefix, settings.max_events_per_job)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task: asyncio.Task[Any] | None = None
        if run_reaper:
            # One pass at start-up: jobs whose worker died while this API was down are ended now.
            try:
                await asyncio.to_thread(reap_once, store, settings)
            except Exception:
                log.exception("start-up reaper pass failed")
            task = asyncio.create_task(reaper_loop(store, settings))
        yield
        if task:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(title="KegNet compression service", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.store = store
    app.state.storage = LocalStorage(settings.data_dir)
    app.state.keys = KeyStore(store.r, settings.key_prefix)
    app.state.enqueue = enqueue or celery_enqueuer(settings)
    app.state.validation_slots = asyncio.Semaphore(settings.max_concurrent_validations)
    # The whole body: every budget together. Each file's own cap is enforced as it is saved (routers/jobs.py).
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_upload_bytes + settings.max_eval_bytes
                       + settings.form_overhead_bytes)

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
