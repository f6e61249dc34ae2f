"""Submitting several checkpoints in one job (a teacher ensemble): storage, caps, validation, idempotency."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.svc_helpers import auth, spec_json, write_mlp_safetensors


def submit_many(client, key, paths: list[Path], headers: dict | None = None, spec: str | None = None):
    handles = [p.open("rb") for p in paths]
    try:
        files = [("checkpoint", (f"../../evil-{i}", h)) for i, h in enumerate(handles)]
        return client.post("/v1/jobs", files=files, data={"spec": spec or spec_json()},
                           headers={**auth(key), **(headers or {})})
    finally:
        for h in handles:
            h.close()


@pytest.fixture
def teachers(tmp_path: Path) -> list[Path]:
    return [write_mlp_safetensors(tmp_path / f"t{i}.safetensors", seed=i) for i in range(3)]


def test_several_checkpoints_are_stored_in_order_under_server_names(client, keys, teachers, settings, enqueued):
    r = submit_many(client, keys["alice"], teachers)
    assert r.status_code == 202, r.text
    job = r.json()
    assert enqueued == [job["id"]] and len(job["checkpoints"]) == 3
    job_dir = settings.data_dir / "jobs" / job["id"]
    stored = [job_dir / "teacher.ckpt", job_dir / "teacher.1.ckpt", job_dir / "teacher.2.ckpt"]
    assert [p.read_bytes() for p in stored] == [p.read_bytes() for p in teachers]
    assert job["checkpoint_sha256"] == job["checkpoints"][0]["sha256"]
    assert len({c["sha256"] for c in job["checkpoints"]}) == 3
    assert not any("evil" in p.name for p in settings.data_dir.rglob("*"))
    assert list((settings.data_dir / "tmp").iterdir()) == []
    again = client.get(f"/v1/jobs/{job['id']}", headers=auth(keys["alice"])).json()
    assert again["checkpoints"] == job["checkpoints"]


def test_one_checkpoint_job_lists_its_file(client, keys, teachers):
    job = submit_many(client, keys["alice"], teachers[:1]).json()
    assert job["checkpoints"] == [{"sha256": job["checkpoint_sha256"], "size": job["checkpoint_size"]}]


@pytest.mark.parametrize("count", [3, 5])
def test_too_many_checkpoints_422_and_nothing_kept(settings, keys, teachers, tmp_path, enqueued, count):
    capped = settings.model_copy(update={"max_teachers": 2})
    paths = (teachers * 2)[:count]  # the form parser stops at the third file: nothing more is spooled
    with TestClient(create_app(capped, enqueue=enqueued.append, run_reaper=False)) as c:
        r = submit_many(c, keys["alice"], paths)
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == "too many files: a job takes at most 2 'checkpoint' files and one 'eval_set'"
    assert enqueued == [] and list((settings.data_dir / "tmp").iterdir()) == []


def test_bad_checkpoint_among_several_is_named(client, keys, teachers, tmp_path, enqueued, settings):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"")
    r = submit_many(client, keys["alice"], [teachers[0], bad, teachers[1]])
    assert r.status_code == 422
    assert r.json()["detail"] == "checkpoint 2 of 3 (index 1): the checkpoint file is empty"
    assert enqueued == [] and list((settings.data_dir / "tmp").iterdir()) == []
    assert not (settings.data_dir / "jobs").exists() or list((settings.data_dir / "jobs").iterdir()) == []


def test_idempotency_covers_every_file_and_their_order(client, keys, teachers, enqueued):
    h = {"Idempotency-Key": "ensemble-1"}
    a, b, c = teachers
    first = submit_many(client, keys["alice"], [a, b], headers=h)
    assert first.status_code == 202
    replay = submit_many(client, keys["alice"], [a, b], headers=h)
    assert replay.status_code == 202 and replay.json()["id"] == first.json()["id"]
    assert replay.headers.get("idempotent-replayed") == "true"
    for other in ([a, c], [b, a], [a]):
        r = submit_many(client, keys["alice"], other, headers=h)
        assert r.status_code == 422 and "Idempotency-Key" in r.text, other
    assert len(enqueued) == 1


def test_the_size_cap_is_for_all_files_together(client, keys, tmp_path, settings):
    # Each file is under the cap (and the body under the body cap), but together they are over it.
    half = settings.max_upload_bytes // 2 + 2048
    parts = []
    for i in range(2):
        parts.append(tmp_path / f"big{i}.bin")
        parts[-1].write_bytes(b"\0" * half)
    r = submit_many(client, keys["alice"], parts)
    assert r.status_code == 413
    assert r.json()["detail"] == f"the checkpoint files together are larger than {settings.max_upload_bytes} bytes"
    assert list((settings.data_dir / "tmp").iterdir()) == []


def test_checkpoint_must_be_a_file(client, keys):
    r = client.post("/v1/jobs", data={"spec": spec_json(), "checkpoint": "not a file"}, headers=auth(keys["alice"]))
    assert r.status_code == 422 and "checkpoint" in r.text


def test_ensemble_fields_are_validated_in_the_spec(client, keys, teachers, enqueued):
    from tests.service.svc_helpers import TINY_CONFIG

    config = {**TINY_CONFIG, "distill": {**TINY_CONFIG["distill"], "ensemble_weighting": "vote"}}
    r = submit_many(client, keys["alice"], teachers[:2], spec=spec_json(config=config))
    assert r.status_code == 422 and "ensemble_weighting" in r.text and enqueued == []
