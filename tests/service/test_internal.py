"""The internal endpoints a remote worker uses (service/routers/internal.py): its job's files only, with its
credential only, while the job runs; uploads checked by sha256 and never visible in part."""

from __future__ import annotations

import hashlib
import socket
import time
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from jobs import credentials
from jobs.settings import Settings
from jobs.store import QUEUED, RUNNING, SUCCEEDED, JobStore
from service.app import create_app, task_args
from tests.service.svc_helpers import REDIS_TEST_URL, auth, spec_json, write_mlp_safetensors

SECRET = "w" * 40


@pytest.fixture
def settings(tmp_path: Path, redis_db: redis.Redis) -> Settings:
    return Settings(redis_url=REDIS_TEST_URL, data_dir=tmp_path / "data", max_upload_bytes=64 * 1024,
                    max_eval_bytes=16 * 1024, form_overhead_bytes=8 * 1024, worker_secret=SECRET)


@pytest.fixture
def store(settings: Settings) -> JobStore:
    return JobStore.from_url(settings.redis_url, settings.key_prefix)


def submit(client: TestClient, key: str, tmp_path: Path) -> dict:
    path = write_mlp_safetensors(tmp_path / "t.safetensors")
    with path.open("rb") as f:
        r = client.post("/v1/jobs", files={"checkpoint": f}, data={"spec": spec_json()}, headers=auth(key))
    assert r.status_code == 202, r.text
    return r.json()


@pytest.fixture
def running(client: TestClient, keys: dict, tmp_path: Path, store: JobStore, settings: Settings) -> tuple[str, str]:
    """A job a worker has started, and the credential its message carried."""
    job_id = submit(client, keys["alice"], tmp_path)["id"]
    args = task_args(settings, job_id)  # what the API puts in the Celery message
    assert args[0] == job_id and store.transition(job_id, RUNNING, {QUEUED})
    return job_id, args[1]


def base(job_id: str) -> str:
    return f"/internal/v1/jobs/{job_id}"


def put(client: TestClient, job_id: str, token: str, name: str, body: bytes, sha256: str | None = None):
    return client.put(f"{base(job_id)}/artifacts/{name}", content=body, headers={
        **auth(token), "X-Checksum-SHA256": sha256 or hashlib.sha256(body).hexdigest()})


def test_the_worker_downloads_its_teacher_with_the_recorded_sha256(client, running, tmp_path, store):
    job_id, token = running
    r = client.get(f"{base(job_id)}/checkpoints/0", headers=auth(token))
    assert r.status_code == 200
    recorded = store.get(job_id)["checkpoints"][0]["sha256"]
    assert r.headers["x-checksum-sha256"] == recorded == hashlib.sha256(r.content).hexdigest()
    assert r.content == (tmp_path / "t.safetensors").read_bytes()
    assert client.get(f"{base(job_id)}/checkpoints/1", headers=auth(token)).status_code == 404
    assert client.get(f"{base(job_id)}/eval-set", headers=auth(token)).status_code == 404  # none was sent


def test_an_upload_is_kept_only_when_its_bytes_match_its_sha256(client, running, settings):
    job_id, token = running
    out = settings.data_dir / "jobs" / job_id / "out"
    body = b'{"student": 1}' * 100
    bad = put(client, job_id, token, "manifest.json", body, sha256="0" * 64)
    assert bad.status_code == 422 and "nothing was kept" in bad.json()["detail"]
    assert not out.exists() or not any(out.iterdir())
    assert put(client, job_id, token, "manifest.json", body).status_code == 201
    assert (out / "manifest.json").read_bytes() == body
    assert put(client, job_id, token, "manifest.json", body[:10]).status_code == 201  # a retry replaces it whole
    assert (out / "manifest.json").read_bytes() == body[:10]
    assert put(client, job_id, token, "../teacher.ckpt", body).status_code == 404
    assert put(client, job_id, token, "notes.txt", body).status_code == 404
    assert put(client, job_id, token, "student.onnx", body, sha256="xyz").status_code == 422
    assert list((settings.data_dir / "tmp").iterdir()) == []  # no temp file left by any of them


def test_an_upload_over_the_cap_is_refused_and_nothing_is_kept(client, running, settings):
    job_id, token = running
    cap = settings.max_upload_bytes + settings.max_eval_bytes + settings.form_overhead_bytes
    r = put(client, job_id, token, "student.pt2", b"x" * (cap + 1))
    assert r.status_code == 413

    def chunks():  # no Content-Length: refused while it streams
        for _ in range(cap // 4096 + 2):
            yield b"x" * 4096

    r = client.put(f"{base(job_id)}/artifacts/student.pt2", content=chunks(),
                   headers={**auth(token), "X-Checksum-SHA256": "0" * 64})
    assert r.status_code == 413
    assert not (settings.data_dir / "jobs" / job_id / "out" / "student.pt2").exists()
    assert list((settings.data_dir / "tmp").iterdir()) == []


def test_a_credential_opens_only_its_own_job(client, keys, running, tmp_path, store, settings):
    job_a, token_a = running
    job_b = submit(client, keys["bob"], tmp_path)["id"]
    store.transition(job_b, RUNNING, {QUEUED})
    token_b = task_args(settings, job_b)[1]
    assert client.get(f"{base(job_b)}/checkpoints/0", headers=auth(token_b)).status_code == 200
    for url in (f"{base(job_b)}/checkpoints/0", f"{base(job_b)}/eval-set"):
        assert client.get(url, headers=auth(token_a)).status_code == 401
    assert put(client, job_b, token_a, "manifest.json", b"{}").status_code == 401
    assert not (settings.data_dir / "jobs" / job_b / "out").exists()
    # Nor does a user key, or nothing at all; and a credential opens nothing under /v1.
    assert client.get(f"{base(job_a)}/checkpoints/0", headers=auth(keys["alice"])).status_code == 401
    assert client.get(f"{base(job_a)}/checkpoints/0").status_code == 401
    assert client.get(f"/v1/jobs/{job_a}", headers=auth(token_a)).status_code == 401


def test_an_expired_credential_and_an_ended_job_are_refused(client, running, store):
    job_id, _ = running
    expired = credentials.mint(SECRET, job_id, ttl_s=60, now=time.time() - 120)
    assert client.get(f"{base(job_id)}/checkpoints/0", headers=auth(expired)).status_code == 401
    _, token = running
    store.transition(job_id, SUCCEEDED, {RUNNING})
    r = client.get(f"{base(job_id)}/checkpoints/0", headers=auth(token))
    assert r.status_code == 403 and "succeeded" in r.json()["detail"]
    assert put(client, job_id, token, "manifest.json", b"{}").status_code == 403


def test_without_a_worker_secret_the_routes_are_off_and_messages_carry_no_credential(settings, keys, tmp_path):
    off = settings.model_copy(update={"worker_secret": None})
    assert task_args(off, "a" * 32) == ["a" * 32]
    with TestClient(create_app(off, enqueue=lambda _: None, run_reaper=False)) as c:
        token = credentials.mint(SECRET, "a" * 32, 60)
        assert c.get(f"{base('a' * 32)}/checkpoints/0", headers=auth(token)).status_code == 404


def test_an_upload_cut_off_halfway_leaves_nothing(tmp_path, redis_db):
    """A real uvicorn: the worker's connection closes after half the declared body."""
    from tests.integration.conftest import Stack

    stack = Stack(tmp_path)
    stack.env.update(KEGNET_WORKER_SECRET=SECRET, KEGNET_HEARTBEAT_STALE_S="300")  # no worker beats here
    settings = Settings(redis_url=REDIS_TEST_URL, data_dir=tmp_path / "data", worker_secret=SECRET)
    store = JobStore.from_url(REDIS_TEST_URL)
    job_id = store.create("alice", {}, sha256="0" * 64, size=1, request_hash="h")["id"]
    store.transition(job_id, RUNNING, {QUEUED}, started_at=repr(time.time()), heartbeat=repr(time.time()))
    token = task_args(settings, job_id)[1]
    body = b"y" * 200_000
    try:
        stack.start_api()
        with socket.create_connection(("127.0.0.1", stack.port)) as s:
            s.sendall((f"PUT {base(job_id)}/artifacts/student.pt2 HTTP/1.1\r\nHost: x\r\n"
                       f"Authorization: Bearer {token}\r\nX-Checksum-SHA256: {hashlib.sha256(body).hexdigest()}\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n").encode() + body[:100_000])
            time.sleep(0.5)
        deadline = time.monotonic() + 10
        while "interrupted" not in stack.logs() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f"upload of {job_id}/student.pt2 interrupted" in stack.logs()
        assert not (settings.data_dir / "jobs" / job_id / "out" / "student.pt2").exists()
        assert list((settings.data_dir / "tmp").glob("*.part")) == []
        # The retry, whole, is kept.
        r = httpx.put(f"{stack.url}{base(job_id)}/artifacts/student.pt2", content=body,
                      headers={**auth(token), "X-Checksum-SHA256": hashlib.sha256(body).hexdigest()})
        assert r.status_code == 201
        assert (settings.data_dir / "jobs" / job_id / "out" / "student.pt2").read_bytes() == body
    finally:
        stack.close()
