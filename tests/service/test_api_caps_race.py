"""The caps hold under concurrent submissions (slots are reserved in Redis before the upload is read), and
an Idempotency-Key never says "still being processed" for a job that is gone."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import jobs.store as store_module
from jobs.store import JobStore
from service.keys import KeyStore
from service.routers import jobs as jobs_router
from tests.service.svc_helpers import auth, spec_json, write_mlp_safetensors


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_mlp_safetensors(tmp_path / "teacher.safetensors")


@pytest.fixture
def store(settings) -> JobStore:
    return JobStore.from_url(settings.redis_url, settings.key_prefix)


@pytest.fixture
def slow_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation takes 0.3 s, as a real teacher does: every concurrent request is past its cap check before
    the first job exists (the window the race went through)."""
    original = jobs_router.preflight.check_static

    def slow(*args, **kwargs):
        time.sleep(0.3)
        return original(*args, **kwargs)

    monkeypatch.setattr(jobs_router.preflight, "check_static", slow)


def _post(client, key: str, body: bytes, headers: dict | None = None):
    return client.post("/v1/jobs", files={"checkpoint": ("t.safetensors", body)}, data={"spec": spec_json()},
                       headers={**auth(key), **(headers or {})})


def _concurrently(client, keys_bodies: list[tuple[str, bytes]]) -> list[int]:
    start = threading.Barrier(len(keys_bodies))

    def one(kb: tuple[str, bytes]) -> int:
        start.wait()
        return _post(client, *kb).status_code

    with ThreadPoolExecutor(len(keys_bodies)) as pool:
        return list(pool.map(one, keys_bodies))


def test_concurrent_submissions_respect_the_per_key_cap(client, keys, ckpt, settings, store, redis_db,
                                                        slow_validation):
    codes = _concurrently(client, [(keys["alice"], ckpt.read_bytes())] * 30)
    assert codes.count(202) == settings.max_active_jobs_per_key == 2, codes
    assert codes.count(429) == 28
    owner = KeyStore(redis_db, settings.key_prefix).lookup(keys["alice"])
    assert store.active_count(owner) == 2 and store.reserved_count() == 0


def test_concurrent_submissions_respect_the_global_cap(client, keys, ckpt, settings, redis_db, store,
                                                       slow_validation):
    ks = KeyStore(redis_db, settings.key_prefix)
    callers = [ks.create(f"u{i}")[1] for i in range(8)]
    codes = _concurrently(client, [(k, ckpt.read_bytes()) for k in callers for _ in range(2)])
    assert codes.count(202) == settings.max_queued_jobs == 3, codes
    assert store.active_count() == 3 and store.reserved_count() == 0


def test_refused_submissions_give_their_slot_back(client, keys, ckpt, store):
    for _ in range(5):  # each held a slot while it was validated
        r = _post(client, keys["alice"], b"not a checkpoint at all")
        assert r.status_code == 422
    assert store.reserved_count() == 0
    assert _post(client, keys["alice"], ckpt.read_bytes()).status_code == 202
    assert _post(client, keys["alice"], ckpt.read_bytes()).status_code == 202


def test_idempotency_key_is_free_after_its_job_is_deleted(client, keys, ckpt, enqueued):
    h = {"Idempotency-Key": "nightly-1"}
    first = _post(client, keys["alice"], ckpt.read_bytes(), h).json()
    assert client.post(f"/v1/jobs/{first['id']}/cancel", headers=auth(keys["alice"])).status_code == 202
    assert client.delete(f"/v1/jobs/{first['id']}", headers=auth(keys["alice"])).status_code == 204
    again = _post(client, keys["alice"], ckpt.read_bytes(), h)
    assert again.status_code == 202, again.text  # not 409 "still being processed"
    assert again.json()["id"] != first["id"] and "idempotent-replayed" not in again.headers
    replay = _post(client, keys["alice"], ckpt.read_bytes(), h)
    assert replay.json()["id"] == again.json()["id"] and replay.headers["idempotent-replayed"] == "true"


def test_stale_claim_naming_no_job_is_replaced(client, keys, ckpt, store, monkeypatch, settings, redis_db):
    """A claim left by a job deleted before deletes freed keys (or by a request that died before creating
    its job) answers 409 "still being processed" only while a request could still be creating that job."""
    owner = KeyStore(redis_db, settings.key_prefix).lookup(keys["alice"])
    probe = _post(client, keys["alice"], ckpt.read_bytes(), {"Idempotency-Key": "probe"}).json()
    request_hash = store.get(probe["id"])["request_hash"]  # the same body and spec: the same request
    real_now = store_module.now
    monkeypatch.setattr(store_module, "now", lambda: real_now() - settings.reservation_ttl_s - 60)
    store.idempotency_claim(owner, "old", request_hash, "f" * 32)  # names a job that does not exist
    monkeypatch.setattr(store_module, "now", real_now)
    fresh = _post(client, keys["alice"], ckpt.read_bytes(), {"Idempotency-Key": "old"})
    assert fresh.status_code == 202, fresh.text
    assert fresh.json()["id"] not in (probe["id"], "f" * 32)


