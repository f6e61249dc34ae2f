"""Worker tests: the task body in-process against real Redis (DB 15) and the real pipeline."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

# The pipeline runs in this process: one torch thread avoids oversubscription on a small, shared CPU.
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))

from svc_helpers import REDIS_TEST_URL  # noqa: E402


@pytest.fixture
def redis_db() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_TEST_URL, decode_responses=True)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip("redis is not running at 127.0.0.1:6379")
    client.flushdb()
    yield client
    client.flushdb()
