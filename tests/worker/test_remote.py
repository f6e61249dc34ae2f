"""A worker with no shared volume (``KEGNET_API_URL``): its files come from a real uvicorn API and go back to
it; the artifacts are the shared-volume worker's, byte for byte; it keeps nothing; faults leave no partial
artifact."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from jobs import credentials
from jobs.settings import Settings
from jobs.storage import LocalStorage
from jobs.store import JobStore
from tests.integration.conftest import Stack
from tests.service.svc_helpers import MLP_MODEL, REDIS_TEST_URL, TINY_CONFIG, write_eval_set, write_mlp_safetensors
from worker.files import OverHttp, SharedVolume
from worker.tasks import run_job

SECRET = "r" * 40


@pytest.fixture
def api(tmp_path: Path, redis_db: redis.Redis) -> Iterator[Stack]:
    """The API alone, as a separate process, with a worker secret; its storage is ``tmp_path/data``."""
    stack = Stack(tmp_path)
    stack.env.update(KEGNET_WORKER_SECRET=SECRET)
    try:
        stack.start_api()
        yield stack
    finally:
        stack.close()


def settings_for(tmp_path: Path, **extra) -> Settings:
    return Settings(redis_url=REDIS_TEST_URL, data_dir=tmp_path / "data", heartbeat_interval_s=0.2,
                    progress_write_interval_s=0, worker_secret=SECRET, **extra)


def submitted(store: JobStore, storage: LocalStorage, tmp_path: Path, eval_set: bool = False) -> str:
    """A queued job with its teacher (and evaluation set) in the API's storage, as a submission leaves it."""
    teacher = write_mlp_safetensors(tmp_path / "t.safetensors")
    ev = write_eval_set(tmp_path / "e.safetensors") if eval_set else None
    digest = hashlib.sha256(teacher.read_bytes()).hexdigest()
    job = store.create("alice", {"model": MLP_MODEL, "config": TINY_CONFIG, "seed": 0, "device": "cpu"},
                       sha256=digest, size=teacher.stat().st_size, request_hash="h",
                       eval_set={"sha256": hashlib.sha256(ev.read_bytes()).hexdigest(), "size": ev.stat().st_size}
                       if ev else None)
    storage.commit_checkpoint(teacher, job["id"])
    if ev:
        storage.commit_eval_set(ev, job["id"])
    return job["id"]


def token(job_id: str, ttl_s: float = 3600, now: float | None = None) -> str:
    return credentials.mint(SECRET, job_id, ttl_s, now)


def test_remote_artifacts_are_the_shared_volume_ones_byte_for_byte(api, tmp_path):
    settings, store = settings_for(tmp_path), JobStore.from_url(REDIS_TEST_URL)
    storage = LocalStorage(settings.data_dir)
    shared = submitted(store, storage, tmp_path, eval_set=True)
    remote = submitted(store, storage, tmp_path, eval_set=True)
    assert run_job(shared, store, SharedVolume(storage), settings) == "succeeded", store.get(shared)["error"]

    worker_tmp = tmp_path / "worker-tmp"
    worker_tmp.mkdir()
    files = OverHttp(api.url, token(remote), settings.model_copy(update={"api_url": api.url}), tmp_root=worker_tmp)
    assert run_job(remote, store, files, settings) == "succeeded", store.get(remote)["error"]
    assert list(worker_tmp.iterdir()) == []  # the worker kept nothing

    a, b = store.get(shared), store.get(remote)
    assert a["artifacts"].keys() == b["artifacts"].keys() and "student.safetensors" in b["artifacts"]
    for name, info in b["artifacts"].items():
        uploaded = (storage.out_dir(remote) / name).read_bytes()
        assert hashlib.sha256(uploaded).hexdigest() == info["sha256"] and len(uploaded) == info["size"]
        if name != "manifest.json":
            assert uploaded == (storage.out_dir(shared) / name).read_bytes(), name
    # The manifest differs only where any two runs differ: the time each stage and forward pass took.
    ma, mb = (json.loads((storage.out_dir(j) / "manifest.json").read_text()) for j in (shared, remote))
    assert _without_timings(ma) == _without_timings(mb)
    assert b["metrics"]["eval_samples"] == a["metrics"]["eval_samples"] == 60


def _without_timings(manifest: dict) -> dict:
    """The manifest less what the clock measured: stage times, speeds, per-layer latencies, the output fit's
    seconds and the figures in the warnings that quote them."""
    out = {k: v for k, v in manifest.items() if k not in ("timings_s", "speed")}
    out["classify"] = {k: v for k, v in manifest["classify"].items() if k != "layer_latency"}
    if out["classify"].get("fit"):  # the output fit's seconds
        out["classify"]["fit"] = {k: v for k, v in out["classify"]["fit"].items() if k != "seconds"}
    # Whether the student timed slower than its teacher is itself a clock reading on a busy machine.
    out["warnings"] = [re.sub(r"[0-9.]+ ms", "# ms", w) for w in manifest["warnings"] if "slower than the" not in w]
    return out


def test_an_expired_or_foreign_credential_fails_the_job_before_the_pipeline(api, tmp_path):
    settings, store = settings_for(tmp_path, api_url=api.url), JobStore.from_url(REDIS_TEST_URL)
    storage = LocalStorage(settings.data_dir)
    job_id, other = submitted(store, storage, tmp_path), submitted(store, storage, tmp_path)
    expired = token(job_id, ttl_s=60, now=time.time() - 120)
    assert run_job(job_id, store, OverHttp(api.url, expired, settings), settings) == "failed"
    error = store.get(job_id)["error"]
    assert "could not be moved" in error and "401" in error and "credential" in error
    assert run_job(other, store, OverHttp(api.url, token(job_id), settings), settings) == "failed"
    assert "401" in store.get(other)["error"]
    assert not storage.out_dir(job_id).exists() and not storage.out_dir(other).exists()


def test_a_job_without_a_credential_fails_with_what_to_set(api, tmp_path):
    settings, store = settings_for(tmp_path, api_url=api.url), JobStore.from_url(REDIS_TEST_URL)
    job_id = submitted(store, LocalStorage(settings.data_dir), tmp_path)
    assert run_job(job_id, store, OverHttp(api.url, None, settings), settings) == "failed"
    assert "KEGNET_WORKER_SECRET" in store.get(job_id)["error"]
