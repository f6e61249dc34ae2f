"""The web page's routes (HTML, static files, CSP), ``/v1/architectures`` and ``/metrics``."""

from __future__ import annotations

import re
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from jobs.store import FAILED, QUEUED, RUNNING, SUCCEEDED, JobStore
from service.app import create_app
from service.routers.web import CSP, WEB_DIR
from tests.service.svc_helpers import auth, spec_json, write_mlp_safetensors


def samples(client: TestClient) -> dict[tuple[str, tuple], float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def submit(client: TestClient, key: str, tmp_path, **spec) -> dict:
    path = write_mlp_safetensors(tmp_path / "t.safetensors")
    with path.open("rb") as f:
        r = client.post("/v1/jobs", files={"checkpoint": f}, data={"spec": spec_json(**spec)}, headers=auth(key))
    return r


def test_pages_are_served_with_a_strict_csp_and_no_inline_script(client):
    for path in ("/", "/jobs/" + "a" * 32):
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-security-policy"] == CSP
        assert "default-src 'self'" in CSP and "frame-ancestors 'none'" in CSP
        assert re.search(r"<script(?![^>]*\bsrc=)", r.text) is None  # every script is a file
        assert "style=" not in r.text and "<style" not in r.text
        assert "http://" not in r.text and "https://" not in r.text  # nothing from another host
    assert 'data-job="' + "a" * 32 + '"' in client.get("/jobs/" + "a" * 32).text
    assert client.get("/jobs/not-an-id").status_code == 404
    for name in ("app.js", "app.css"):
        assert client.get(f"/static/{name}").status_code == 200


def test_page_and_assets_weigh_under_200_kb():
    total = sum(p.stat().st_size for p in WEB_DIR.rglob("*") if p.is_file())
    assert total <= 200 * 1024, total


def test_architectures_are_searchable_without_a_key(client):
    names = client.get("/v1/architectures", params={"q": "res", "limit": 20}).json()
    assert 0 < len(names) <= 20 and all("res" in n.lower() for n in names)
    assert names[0] == "resnet"  # a name that starts with the query comes first
    assert "torchvision:resnet18" in client.get("/v1/architectures", params={"q": "resnet18"}).json()
    assert any(n.startswith("timm:") for n in client.get("/v1/architectures", params={"q": "vit"}).json())
    assert client.get("/v1/architectures", params={"limit": 0}).status_code == 422


def test_metrics_count_jobs_by_state_and_their_durations(client, keys, settings, tmp_path):
    store = JobStore.from_url(settings.redis_url, settings.key_prefix)
    a = submit(client, keys["alice"], tmp_path).json()["id"]
    b = submit(client, keys["alice"], tmp_path).json()["id"]
    assert store.transition(a, RUNNING, {QUEUED}, started_at=repr(time.time() - 3))
    out = settings.data_dir / "jobs" / a / "out"
    out.mkdir(parents=True)
    (out / "manifest.json").write_text('{"timings_s": {"generators": 2.0, "finetune": 0.5}}')
    assert store.transition(a, SUCCEEDED, {RUNNING})
    assert store.transition(b, FAILED, {QUEUED})
    s = samples(client)
    assert s[("kegnet_jobs", (("state", "succeeded"),))] == 1
    assert s[("kegnet_jobs", (("state", "failed"),))] == 1
    assert s[("kegnet_jobs", (("state", "running"),))] == 0
    assert s[("kegnet_job_duration_seconds_count", (("state", "succeeded"),))] == 1
    assert s[("kegnet_job_duration_seconds_sum", (("state", "succeeded"),))] == pytest.approx(3, abs=1)
    assert s[("kegnet_stage_duration_seconds_sum", (("stage", "generators"),))] == 2.0
    assert s[("kegnet_stage_duration_seconds_bucket", (("le", "1.0"), ("stage", "finetune")))] == 1
    assert s[("kegnet_queue_length", ())] == 0  # nothing reaches the broker in these tests (enqueue is a list)
    assert s[("kegnet_live_workers", ())] == 0
    store.worker_heartbeat("w1@host")
    assert samples(client)[("kegnet_live_workers", ())] == 1


def test_refused_uploads_are_counted_by_status(client, keys, tmp_path):
    before = samples(client)
    assert before[("kegnet_uploads_refused_total", (("status", "422"),))] == 0
    bad = submit(client, keys["alice"], tmp_path, model={"arch": "mlp", "input_shape": [0], "num_classes": 3})
    assert bad.status_code == 422
    too_big = client.post("/v1/jobs", files={"checkpoint": ("t.safetensors", b"x" * (200 * 1024))},
                          data={"spec": spec_json()}, headers=auth(keys["alice"]))
    assert too_big.status_code == 413
    assert client.post("/v1/jobs", headers=auth("wrong")).status_code == 401  # not an upload refusal
    after = samples(client)
    assert after[("kegnet_uploads_refused_total", (("status", "422"),))] == 1
    assert after[("kegnet_uploads_refused_total", (("status", "413"),))] == 1


def test_each_app_has_its_own_registry(settings, enqueued):
    first, second = create_app(settings, enqueue=enqueued.append, run_reaper=False), \
        create_app(settings, enqueue=enqueued.append, run_reaper=False)
    assert first.state.metrics is not second.state.metrics
