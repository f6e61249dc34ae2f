"""Clean restarts (issue 20, part 3): what a dead API instance held is let go, an Idempotency-Key is checked
before the body is read, event streams are capped per key, and /openapi.json can submit a job."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from jobs.instances import InstanceRegistry
from jobs.store import RUNNING, SUCCEEDED, JobStore
from jobs.streams import StreamLeases
from service.app import create_app
from service.keys import KeyStore
from service.routers import jobs as jobs_router
from tests.service.svc_helpers import auth, spec_json, write_mlp_safetensors

OTHER_HOST_DEAD = "gone-host:4242:0123456789ab"  # no liveness key: dead however long ago it stopped


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_mlp_safetensors(tmp_path / "teacher.safetensors")


@pytest.fixture
def alice(keys, redis_db, settings) -> str:
    return KeyStore(redis_db, settings.key_prefix).lookup(keys["alice"])


@pytest.fixture
def body_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the submissions whose form (the upload) was read."""
    calls: list[int] = []
    original = jobs_router._receive

    async def counting(*args, **kwargs):
        calls.append(1)
        return await original(*args, **kwargs)

    monkeypatch.setattr(jobs_router, "_receive", counting)
    return calls


def _post(client, key: str, body: bytes, headers: dict | None = None):
    return client.post("/v1/jobs", files={"checkpoint": ("t.safetensors", body)}, data={"spec": spec_json()},
                       headers={**auth(key), **(headers or {})})


def _store_of(settings, instance: str | None) -> JobStore:
    return JobStore.from_url(settings.redis_url, settings.key_prefix, instance=instance)


def _hold(settings, instance: str, owner: str, key: str) -> tuple[JobStore, str]:
    """What a request of ``instance`` holds mid-upload: a slot, and a claim of ``key`` naming an uncreated job."""
    dead = _store_of(settings, instance)
    dead.instances.beat()
    token, _ = dead.reserve_slot(owner, 10, 10, ttl_s=900)
    dead.idempotency_claim(owner, key, "hash-of-a-request", "e" * 32)
    return dead, token  # type: ignore[return-value]


def _fill_key(client, key: str, body: bytes, n: int = 2) -> None:
    for _ in range(n):
        assert _post(client, key, body).status_code == 202


# ---- start-up recovery


def test_start_up_releases_a_dead_instances_slots_claims_and_uploads(settings, alice, redis_db):
    same_host_dead = f"{socket.gethostname()}:{2 ** 22 + 7}:aaaaaaaaaaaa"  # above pid_max: never running
    live_elsewhere = "other-host:1:bbbbbbbbbbbb"
    dead, _ = _hold(settings, same_host_dead, alice, "k-dead")
    live, _ = _hold(settings, live_elsewhere, alice, "k-live")
    _hold(settings, OTHER_HOST_DEAD, alice, "k-gone")
    redis_db.delete(f"{settings.key_prefix}:instance:{OTHER_HOST_DEAD}")  # its liveness key expired
    tmp = settings.data_dir / "tmp"
    tmp.mkdir(parents=True)
    orphans = [tmp / "aaaaaaaaaaaa-1.part", tmp / "0123456789ab-2.part", tmp / "untagged.part"]
    kept = tmp / "bbbbbbbbbbbb-3.part"
    for p in [*orphans, kept]:
        p.write_bytes(b"half an upload")
    assert dead.reserved_count(alice) == 3

    with TestClient(create_app(settings, enqueue=lambda _: None, run_reaper=False)):
        assert not any(p.exists() for p in orphans) and kept.exists()
        assert dead.reserved_count(alice) == 1  # the live replica's slot stays
        assert dead.idempotency_get(alice, "k-dead") is None and dead.idempotency_get(alice, "k-gone") is None
        assert live.idempotency_get(alice, "k-live") is not None
        assert live.instances.known() == sorted([live_elsewhere, *_live_apis(live)])


def _live_apis(store: JobStore) -> list[str]:
    return [i for i in store.instances.known() if i.startswith(f"{socket.gethostname()}:{os.getpid()}:")]


def test_a_clean_stop_deregisters_the_instance(settings):
    app = create_app(settings, enqueue=lambda _: None, run_reaper=False)
    with TestClient(app):
        registry = InstanceRegistry(app.state.store.r, settings.key_prefix)
        assert app.state.instance in registry.known() and registry.alive(app.state.instance)
    assert app.state.instance not in registry.known()


def test_an_instance_restarted_with_the_same_pid_is_a_new_one():
    from jobs.instances import dead_on_this_host

    host = socket.gethostname()
    me = f"{host}:{os.getpid()}:cccccccccccc"
    assert dead_on_this_host(f"{host}:{os.getpid()}:dddddddddddd", me)  # pid 1 in a restarted container
    assert not dead_on_this_host(me, me)
    assert not dead_on_this_host(f"other-host:{2 ** 22 + 7}:dddddddddddd", me)  # another host: its key decides


# ---- the Idempotency-Key before the body


def test_a_claim_of_a_dead_instance_is_usable_at_once(client, keys, ckpt, settings, alice, body_reads):
    _hold(settings, f"{socket.gethostname()}:{2 ** 22 + 9}:aaaaaaaaaaaa", alice, "retry-me")
    r = _post(client, keys["alice"], ckpt.read_bytes(), {"Idempotency-Key": "retry-me"})
    assert r.status_code == 202, r.text  # not 409 for reservation_ttl_s


def test_a_stale_claim_reserves_before_the_body_is_read(client, keys, ckpt, settings, alice, body_reads):
    _fill_key(client, keys["alice"], ckpt.read_bytes())
    _hold(settings, OTHER_HOST_DEAD, alice, "old")
    client.app.state.store.r.delete(f"{settings.key_prefix}:instance:{OTHER_HOST_DEAD}")
    body_reads.clear()
    r = _post(client, keys["alice"], ckpt.read_bytes(), {"Idempotency-Key": "old"})
    assert r.status_code == 429 and r.headers["retry-after"] and body_reads == []


def test_a_claim_still_in_flight_is_409_before_the_body_is_read(client, keys, ckpt, settings, alice, body_reads):
    _hold(settings, "other-host:1:ffffffffffff", alice, "busy")  # a replica elsewhere, its liveness key fresh
    r = _post(client, keys["alice"], ckpt.read_bytes(), {"Idempotency-Key": "busy"})
    assert r.status_code == 409 and "still being processed" in r.json()["detail"] and body_reads == []


def test_a_key_naming_a_job_replays_it_without_a_slot(client, keys, ckpt, body_reads):
    first = _post(client, keys["alice"], ckpt.read_bytes(), {"Idempotency-Key": "nightly"})
    _fill_key(client, keys["alice"], ckpt.read_bytes(), n=1)  # the key's cap is full now
    again = _post(client, keys["alice"], ckpt.read_bytes(), {"Idempotency-Key": "nightly"})
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"


# ---- event streams per key


def _finished_job(client, keys, ckpt, settings) -> str:
    job_id = _post(client, keys["alice"], ckpt.read_bytes()).json()["id"]
    store = client.app.state.store
    assert store.transition(job_id, RUNNING, {"queued"}) and store.transition(job_id, SUCCEEDED, {RUNNING})
    return job_id


def test_event_streams_are_capped_per_key(client, keys, ckpt, settings, alice):
    job_id = _finished_job(client, keys, ckpt, settings)
    elsewhere = StreamLeases(client.app.state.store.r, settings.key_prefix, "other-host:1:bbbbbbbbbbbb")
    held = [elsewhere.open(alice, 99) for _ in range(settings.max_event_streams_per_key)]
    sse = {**auth(keys["alice"]), "Accept": "text/event-stream"}
    r = client.get(f"/v1/jobs/{job_id}/events", headers=sse)
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0 and "open event streams" in r.text
    assert client.get(f"/v1/jobs/{job_id}/events", headers=auth(keys["alice"])).status_code == 200  # polling
    elsewhere.close(alice, held.pop())
    r = client.get(f"/v1/jobs/{job_id}/events", headers=sse)
    assert r.status_code == 200 and "event: status" in r.text
    assert elsewhere.count(alice) == settings.max_event_streams_per_key - 1  # the finished stream let go


def test_a_crashed_instances_streams_expire(client, keys, ckpt, settings, alice):
    job_id = _finished_job(client, keys, ckpt, settings)
    crashed = StreamLeases(client.app.state.store.r, settings.key_prefix, OTHER_HOST_DEAD, ttl_s=0.2)
    for _ in range(settings.max_event_streams_per_key):
        assert crashed.open(alice, 99)
    time.sleep(0.3)  # never closed, never renewed
    sse = {**auth(keys["alice"]), "Accept": "text/event-stream"}
    assert client.get(f"/v1/jobs/{job_id}/events", headers=sse).status_code == 200


# ---- OpenAPI


def test_openapi_describes_the_multipart_body_and_the_bearer_scheme(client):
    schema = client.get("/openapi.json").json()
    post = schema["paths"]["/v1/jobs"]["post"]
    form = post["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"checkpoint", "spec", "eval_set"} <= set(form["properties"]) and form["required"] == ["checkpoint",
                                                                                                   "spec"]
    assert form["properties"]["checkpoint"]["items"]["format"] == "binary"
    assert schema["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "an API key made by `python -m service.keys create`"}
    for path, method in (("/v1/jobs", "post"), ("/v1/jobs", "get"), ("/v1/jobs/{job_id}", "get"),
                         ("/v1/jobs/{job_id}/events", "get")):
        assert {"bearerAuth": []} in schema["paths"][path][method]["security"], (path, method)


def test_401_is_unchanged(client):
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer kgn_nope"}):
        r = client.get("/v1/jobs", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["detail"] == "missing or invalid API key; send 'Authorization: Bearer <key>'"


def test_a_claim_is_on_the_instances_record_before_it_exists(settings, alice, monkeypatch: pytest.MonkeyPatch):
    """An instance killed right after its claim is made (the integration test freezes one there) leaves a
    claim start-up can find: the record is written first."""
    store = _store_of(settings, f"{socket.gethostname()}:{2 ** 22 + 9}:cccccccccccc")
    store.instances.beat()
    recorded_first: list[bool] = []
    real_set = store.r.set

    def set_and_look(name, *args, **kwargs):
        if ":idem:" in str(name):
            recorded_first.append(any(f.startswith("idem:") for f in store.instances.held(store.instance)))
        return real_set(name, *args, **kwargs)

    monkeypatch.setattr(store.r, "set", set_and_look)
    store.idempotency_claim(alice, "k-first", "hash", "f" * 32)
    assert recorded_first == [True]
    monkeypatch.undo()
    survivor = _store_of(settings, None)  # start-up of another process: that pid never ran, so it is dead
    assert survivor.release_dead_instances() == (0, 1)
    assert survivor.idempotency_get(alice, "k-first") is None
