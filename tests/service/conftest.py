"""API tests: FastAPI TestClient against a real Redis (DB 15, flushed per test), no worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from jobs.settings import Settings
from service.app import create_app
from service.keys import KeyStore
from tests.service.svc_helpers import REDIS_TEST_URL


@pytest.fixture
def settings(tmp_path: Path, redis_db: redis.Redis) -> Settings:
    return Settings(redis_url=REDIS_TEST_URL, data_dir=tmp_path / "data", max_upload_bytes=64 * 1024,
                    max_eval_bytes=16 * 1024, form_overhead_bytes=8 * 1024, max_active_jobs_per_key=2,
                    max_queued_jobs=3)


@pytest.fixture
def enqueued() -> list[str]:
    return []


@pytest.fixture
def client(settings: Settings, enqueued: list[str]) -> Iterator[TestClient]:
    app = create_app(settings, enqueue=enqueued.append, run_reaper=False)
    with TestClient(app) as c:
        yield c


@pytest.fixture
def keys(redis_db: redis.Redis, settings: Settings) -> dict[str, str]:
    store = KeyStore(redis_db, settings.key_prefix)
    return {"alice": store.create("alice")[1], "bob": store.create("bob")[1]}
