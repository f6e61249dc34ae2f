"""The optional ``eval_set`` upload: checked before the job exists, stored under a server name, bounded, hashed
into the idempotency request, removed with the job."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from jobs.store import JobStore
from tests.service.svc_helpers import (
    auth,
    spec_json,
    write_eval_set,
    write_evil_pickle,
    write_mlp_safetensors,
)


def submit(client, key: str, ckpt: Path, eval_sets: list[Path] = (), headers: dict | None = None):
    handles = [ckpt.open("rb"), *(p.open("rb") for p in eval_sets)]
    try:
        files = [("checkpoint", ("t.bin", handles[0]))]
        files += [("eval_set", ("../../evil-eval", h)) for h in handles[1:]]
        return client.post("/v1/jobs", files=files, data={"spec": spec_json()},
                           headers={**auth(key), **(headers or {})})
    finally:
        for h in handles:
            h.close()


@pytest.fixture
def store(settings) -> JobStore:
    return JobStore.from_url(settings.redis_url, settings.key_prefix)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_mlp_safetensors(tmp_path / "teacher.safetensors")


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return write_eval_set(tmp_path / "eval.safetensors")


def _nothing_kept(settings, enqueued) -> None:
    assert enqueued == [] and list((settings.data_dir / "tmp").iterdir()) == []
    jobs = settings.data_dir / "jobs"
    assert not jobs.exists() or list(jobs.iterdir()) == []


def test_eval_set_is_stored_under_a_server_name_and_recorded(client, keys, ckpt, good, settings, enqueued):
    r = submit(client, keys["alice"], ckpt, [good])
    assert r.status_code == 202, r.text
    job = r.json()
    data = good.read_bytes()
    assert job["eval_set"] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    stored = settings.data_dir / "jobs" / job["id"] / "eval.safetensors"
    assert stored.read_bytes() == data and enqueued == [job["id"]]
    assert not any("evil" in p.name for p in settings.data_dir.rglob("*"))
    assert list((settings.data_dir / "tmp").iterdir()) == []
    url, h = f"/v1/jobs/{job['id']}", auth(keys["alice"])
    assert client.get(url, headers=h).json()["eval_set"] == job["eval_set"]
    # Deleting the (cancelled) job removes its evaluation file with the rest of its directory.
    assert client.post(f"{url}/cancel", headers=h).json()["status"] == "cancelled"
    assert client.delete(url, headers=h).status_code == 204
    assert not stored.exists() and not stored.parent.exists()


def test_a_job_without_eval_set_says_none(client, keys, ckpt, store):
    job = submit(client, keys["alice"], ckpt).json()
    assert job["eval_set"] is None
    # Jobs created before the field existed have no hash entry for it: they read as None too.
    store.r.hdel(f"{store.p}:job:{job['id']}", "eval_set")
    assert store.get(job["id"])["eval_set"] is None
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth(keys["alice"])).json()["eval_set"] is None


def test_wrong_shape_is_422_naming_the_field(client, keys, ckpt, tmp_path, settings, enqueued):
    bad = write_eval_set(tmp_path / "bad.safetensors", shape=(9,))
    r = submit(client, keys["alice"], ckpt, [bad])
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail.startswith("eval_set: ") and "'x' must have shape (N, 8)" in detail and "(60, 9)" in detail
    _nothing_kept(settings, enqueued)


def test_a_pickle_is_refused_unread(client, keys, ckpt, tmp_path, settings, enqueued):
    marker = tmp_path / "pwned"
    evil = write_evil_pickle(tmp_path / "eval.pt", marker)  # torch.save: a zip holding a pickle
    r = submit(client, keys["alice"], ckpt, [evil])
    assert r.status_code == 422
    assert r.json()["detail"].startswith("eval_set: the evaluation set is not a readable safetensors file")
    assert not marker.exists()
    _nothing_kept(settings, enqueued)


def test_two_eval_sets_are_422(client, keys, ckpt, good, settings, enqueued):
    r = submit(client, keys["alice"], ckpt, [good, good])
    assert r.status_code == 422
    assert r.json()["detail"] == "eval_set: send at most one 'eval_set' file, got 2"
    _nothing_kept(settings, enqueued)


def test_eval_set_must_be_a_file(client, keys, ckpt, settings, enqueued):
    with ckpt.open("rb") as f:
        r = client.post("/v1/jobs", files={"checkpoint": ("t", f)}, data={"spec": spec_json(), "eval_set": "x"},
                        headers=auth(keys["alice"]))
    assert r.status_code == 422 and r.json()["detail"].startswith("eval_set: 'eval_set' must be a file")
    _nothing_kept(settings, enqueued)


def test_oversize_eval_set_is_413(client, keys, ckpt, tmp_path, settings, enqueued):
    # Within the body cap (checkpoint budget + evaluation budget + overhead), over the evaluation budget.
    big = tmp_path / "big.safetensors"
    big.write_bytes(b"\0" * (settings.max_eval_bytes + 100))
    r = submit(client, keys["alice"], ckpt, [big])
    assert r.status_code == 413
    assert r.json()["detail"] == (f"eval_set: the evaluation set is larger than {settings.max_eval_bytes} bytes; "
                                  "send fewer samples")
    _nothing_kept(settings, enqueued)


def test_eval_budget_lends_no_room_to_checkpoints(client, keys, tmp_path, settings):
    # The body cap grew by the evaluation budget; the checkpoint cap did not.
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (settings.max_upload_bytes + settings.max_eval_bytes // 2))
    r = submit(client, keys["alice"], big)
    assert r.status_code == 413 and "the checkpoint is larger than" in r.json()["detail"]


def test_too_many_samples_is_422(client, keys, ckpt, good, settings, enqueued):
    from fastapi.testclient import TestClient

    from service.app import create_app

    capped = settings.model_copy(update={"max_eval_samples": 50})
    with TestClient(create_app(capped, enqueue=enqueued.append, run_reaper=False)) as c:
        r = submit(c, keys["alice"], ckpt, [good])  # 60 samples
    assert r.status_code == 422 and "1 <= N <= 50" in r.json()["detail"]
    _nothing_kept(settings, enqueued)


def test_a_different_eval_set_is_a_different_request(client, keys, ckpt, good, tmp_path, enqueued):
    h = {"Idempotency-Key": "eval-1"}
    first = submit(client, keys["alice"], ckpt, [good], headers=h)
    assert first.status_code == 202
    replay = submit(client, keys["alice"], ckpt, [good], headers=h)
    assert replay.status_code == 202 and replay.json()["id"] == first.json()["id"]
    other = write_eval_set(tmp_path / "other.safetensors", seed=1)
    for eval_sets in ([other], []):
        r = submit(client, keys["alice"], ckpt, eval_sets, headers=h)
        assert r.status_code == 422 and "Idempotency-Key" in r.json()["detail"], eval_sets
    assert len(enqueued) == 1


