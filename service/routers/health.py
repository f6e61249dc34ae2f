"""Liveness (the process answers) and readiness (Redis answers and a worker beat recently)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from jobs.settings import Settings
from jobs.store import JobStore
from service.deps import get_settings_dep, get_store

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(store: JobStore = Depends(get_store), settings: Settings = Depends(get_settings_dep)) -> JSONResponse:
    checks: dict[str, object] = {}
    try:
        checks["redis"] = store.ping()
    except Exception as exc:  # any connection error means not ready
        checks["redis"] = False
        checks["redis_error"] = type(exc).__name__
    workers: list[str] = []
    if checks["redis"]:
        workers = store.live_workers(within_s=3 * settings.heartbeat_interval_s + 5)
    checks["workers"] = workers
    ready = bool(checks["redis"]) and bool(workers)
    return JSONResponse({"status": "ready" if ready else "not ready", **checks}, status_code=200 if ready else 503)
