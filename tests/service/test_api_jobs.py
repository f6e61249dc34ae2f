"""Reading, following, cancelling and deleting jobs; isolation between callers; health."""

from __future__ import annotations

import json

import pytest

from jobs.store import FAILED, QUEUED, RUNNING, SUCCEEDED, JobStore
from tests.service.svc_helpers import REDIS_TEST_URL, auth, spec_json, write_mlp_safetensors


@pytest.fixture
def store(settings) -> JobStore:
    return JobStore.from_url(settings.redis_url, settings.key_prefix)


@pytest.fixture
def job(client, keys, tmp_path) -> dict:
    path = write_mlp_safetensors(tmp_path / "t.safetensors")
    with path.open("rb") as f:
        r = client.post("/v1/jobs", files={"checkpoint": f}, data={"spec": spec_json()}, headers=auth(keys["alice"]))
    assert r.status_code == 202
    return r.json()


def finish(store: JobStore, settings, job_id: str) -> None:
    """Pretend a worker ran the job and wrote one artifact."""
    assert store.transition(job_id, RUNNING, {QUEUED})
    out = settings.data_dir / "jobs" / job_id / "out"
    out.mkdir(parents=True)
    (out / "manifest.json").write_text('{"ok": true}')
    import hashlib

    digest = hashlib.sha256(b'{"ok": true}').hexdigest()
    assert store.transition(job_id, SUCCEEDED, {RUNNING},
                            artifacts={"manifest.json": {"size": 12, "sha256": digest}})


def test_other_callers_job_is_404(client, keys, job):
    bob = auth(keys["bob"])
    base = f"/v1/jobs/{job['id']}"
    for method, url in [("get", base), ("post", f"{base}/cancel"), ("delete", base), ("get", f"{base}/events"),
                        ("get", f"{base}/artifacts"), ("get", f"{base}/artifacts/manifest.json")]:
        assert client.request(method, url, headers=bob).status_code == 404, (method, url)
    assert client.get("/v1/jobs", headers=bob).json()["jobs"] == []
    assert client.get(base, headers=auth(keys["alice"])).json()["status"] == "queued"


def test_malformed_job_id_404(client, keys):
    assert client.get("/v1/jobs/..%2F..%2Fetc", headers=auth(keys["alice"])).status_code == 404
    assert client.get("/v1/jobs/" + "0" * 32, headers=auth(keys["alice"])).status_code == 404


def test_list_newest_first_with_cursor(client, keys, tmp_path, settings, store):
    path = write_mlp_safetensors(tmp_path / "t.safetensors")
    ids = []
    for _ in range(5):
        with path.open("rb") as f:
            r = client.post("/v1/jobs", files={"checkpoint": f}, data={"spec": spec_json()},
                            headers=auth(keys["alice"]))
        ids.append(r.json()["id"])
        store.transition(ids[-1], "cancelled", {QUEUED})  # stay under the active cap
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=params, headers=auth(keys["alice"])).json()
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ids[::-1]


def test_cancel_queued_then_terminal_never_changes(client, keys, job, store):
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(keys["alice"]))
    assert r.json()["status"] == "cancelled"
    # a late worker cannot resurrect it
    assert not store.transition(job["id"], RUNNING, {QUEUED})
    assert not store.transition(job["id"], SUCCEEDED, {RUNNING, "cancelling"})
    assert not store.update_running(job["id"], progress="0.5")
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(keys["alice"])).status_code == 409
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth(keys["alice"])).json()["status"] == "cancelled"


def test_cancel_running_asks_worker(client, keys, job, store):
    store.transition(job["id"], RUNNING, {QUEUED})
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(keys["alice"]))
    assert r.json()["status"] == "cancelling"
    assert store.cancel_requested(job["id"])


def test_delete_only_terminal_and_removes_files(client, keys, job, settings, store):
    url = f"/v1/jobs/{job['id']}"
    assert client.delete(url, headers=auth(keys["alice"])).status_code == 409
    finish(store, settings, job["id"])
    assert client.delete(url, headers=auth(keys["alice"])).status_code == 204
    assert not (settings.data_dir / "jobs" / job["id"]).exists()
    assert client.get(url, headers=auth(keys["alice"])).status_code == 404


def test_artifacts_listing_and_download(client, keys, job, settings, store):
    finish(store, settings, job["id"])
    base = f"/v1/jobs/{job['id']}/artifacts"
    arts = client.get(base, headers=auth(keys["alice"])).json()
    assert [a["name"] for a in arts] == ["manifest.json"] and arts[0]["size"] == 12
    r = client.get(f"{base}/manifest.json", headers=auth(keys["alice"]))
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert r.headers["x-checksum-sha256"] == arts[0]["sha256"]
    for name in ["student.pt2", "teacher.ckpt", "..%2Fteacher.ckpt", "%2Fetc%2Fpasswd"]:
        assert client.get(f"{base}/{name}", headers=auth(keys["alice"])).status_code == 404, name


def test_events_json_page_and_sse(client, keys, job, store, settings):
    store.transition(job["id"], RUNNING, {QUEUED})
    store.add_event(job["id"], {"type": "progress", "stage": "generators", "progress": 0.3})
    page = client.get(f"/v1/jobs/{job['id']}/events", headers=auth(keys["alice"])).json()
    assert [e["seq"] for e in page["events"]] == [1, 2, 3] and page["next_after"] == 3
    page = client.get(f"/v1/jobs/{job['id']}/events", params={"after": 2}, headers=auth(keys["alice"])).json()
    assert [e["type"] for e in page["events"]] == ["progress"]
    store.transition(job["id"], FAILED, {RUNNING}, error="boom")
    with client.stream("GET", f"/v1/jobs/{job['id']}/events",
                       headers={**auth(keys["alice"]), "Accept": "text/event-stream"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        data = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [d["seq"] for d in data] == [1, 2, 3, 4] and data[-1]["status"] == "failed"


def test_health_and_readiness(client, store):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["redis"] is True and r.json()["workers"] == []
    store.worker_heartbeat("celery@test")
    assert client.get("/readyz").status_code == 200


def test_auth_disabled_dev_mode(settings, tmp_path):
    from fastapi.testclient import TestClient

    from service.app import create_app

    dev = settings.model_copy(update={"auth_disabled": True})
    with TestClient(create_app(dev, enqueue=lambda _: None, run_reaper=False)) as c:
        path = write_mlp_safetensors(tmp_path / "t.safetensors")
        with path.open("rb") as f:
            assert c.post("/v1/jobs", files={"checkpoint": f}, data={"spec": spec_json()}).status_code == 202


def test_key_cli_create_and_revoke(redis_db, settings):
    from service.keys import KeyStore

    ks = KeyStore(redis_db, settings.key_prefix)
    key_id, key = ks.create("carol")
    assert ks.lookup(key) == key_id
    assert not any(key in v for v in map(str, redis_db.mget(redis_db.keys("*"))))  # only the hash is stored
    assert ks.revoke(key_id) and ks.lookup(key) is None


def test_key_cli_entrypoint(redis_db, monkeypatch):
    from typer.testing import CliRunner

    from jobs.settings import get_settings
    from service import keys as keys_mod

    monkeypatch.setenv("KEGNET_REDIS_URL", REDIS_TEST_URL)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(keys_mod.cli, ["create", "--name", "dave"])
        assert result.exit_code == 0
        key = result.stdout.strip().splitlines()[-1]
        assert key.startswith("kgn_")
        assert CliRunner().invoke(keys_mod.cli, ["revoke", key]).exit_code == 0
        assert CliRunner().invoke(keys_mod.cli, ["revoke", key]).exit_code == 1
    finally:
        get_settings.cache_clear()


