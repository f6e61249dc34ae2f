"""Job-domain tests: the store, storage, settings and reaper against a real Redis (flushed per test), no HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from jobs.settings import Settings
from jobs.store import JobStore
from tests.service.svc_helpers import REDIS_TEST_URL


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(redis_url=REDIS_TEST_URL, data_dir=tmp_path / "data")


@pytest.fixture
def store(settings: Settings, redis_db: redis.Redis) -> JobStore:
    return JobStore.from_url(settings.redis_url, settings.key_prefix)
