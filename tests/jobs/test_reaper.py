"""The reaper's policy: a running job whose heartbeat stopped is lost; a live one is left alone."""

from __future__ import annotations

import time

import pytest

from jobs.reaper import LOST, reap_once
from jobs.store import QUEUED, RUNNING, JobStore


@pytest.fixture
def job(store: JobStore) -> dict:
    return store.create("alice", {}, sha256="0" * 64, size=1, request_hash="h")


def test_reaper_fails_running_job_with_stale_heartbeat(job, store, settings):
    store.transition(job["id"], RUNNING, {QUEUED}, started_at="1", heartbeat="1")
    assert reap_once(store, settings) == [job["id"]]
    got = store.get(job["id"])
    assert got["status"] == "failed" and got["error"] == LOST
    assert store.active_count() == 0


def test_reaper_leaves_live_jobs(job, store, settings):
    store.transition(job["id"], RUNNING, {QUEUED}, started_at=repr(time.time()), heartbeat=repr(time.time()))
    assert reap_once(store, settings) == []
    assert store.get(job["id"])["status"] == "running"
