"""Submitting jobs: validation, idempotency, limits. Every bad upload is refused before it is queued."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.service.svc_helpers import (
    MLP_MODEL,
    auth,
    mlp_state,
    spec_json,
    write_evil_pickle,
    write_mlp_safetensors,
    write_mlp_torch,
)


def submit(client, key, path: Path, spec: str | None = None, headers: dict | None = None):
    with path.open("rb") as f:
        return client.post("/v1/jobs", files={"checkpoint": ("whatever.bin", f)},
                           data={"spec": spec or spec_json()}, headers={**auth(key), **(headers or {})})


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_mlp_safetensors(tmp_path / "teacher.safetensors")


def test_submit_accepted_and_queued(client, keys, ckpt, enqueued):
    r = submit(client, keys["alice"], ckpt)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and enqueued == [job["id"]]
    assert job["request"]["model"]["arch"] == "mlp"
    got = client.get(f"/v1/jobs/{job['id']}", headers=auth(keys["alice"])).json()
    assert got["checkpoint_sha256"] == job["checkpoint_sha256"]


def test_int8_is_asked_for_in_the_config(client, keys, ckpt, enqueued):
    r = submit(client, keys["alice"], ckpt, spec=spec_json(config={"compression": {"quantize": "int8"}}))
    assert r.status_code == 202, r.text
    assert r.json()["request"]["config"]["compression"]["quantize"] == "int8"


def test_torch_save_state_dict_accepted(client, keys, tmp_path):
    r = submit(client, keys["alice"], write_mlp_torch(tmp_path / "t.pt"))
    assert r.status_code == 202, r.text


def test_client_filename_is_never_a_path(client, keys, ckpt, settings):
    with ckpt.open("rb") as f:
        r = client.post("/v1/jobs", files={"checkpoint": ("../../../../etc/evil", f)},
                        data={"spec": spec_json()}, headers=auth(keys["alice"]))
    assert r.status_code == 202
    stored = list((settings.data_dir / "jobs").rglob("*"))
    assert all("evil" not in p.name for p in stored)
    assert (settings.data_dir / "jobs" / r.json()["id"] / "teacher.ckpt").is_file()


def test_requires_api_key(client, ckpt):
    with ckpt.open("rb") as f:
        r = client.post("/v1/jobs", files={"checkpoint": f}, data={"spec": spec_json()})
    assert r.status_code == 401
    assert client.get("/v1/jobs", headers=auth("kgn_not-a-key")).status_code == 401


def test_idempotency_same_body_same_job(client, keys, ckpt, enqueued):
    h = {"Idempotency-Key": "abc-1"}
    a = submit(client, keys["alice"], ckpt, headers=h)
    b = submit(client, keys["alice"], ckpt, headers=h)
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] == b.json()["id"] and len(enqueued) == 1
    assert b.headers.get("idempotent-replayed") == "true"


def test_idempotency_other_body_422(client, keys, ckpt, tmp_path):
    h = {"Idempotency-Key": "abc-2"}
    assert submit(client, keys["alice"], ckpt, headers=h).status_code == 202
    other = write_mlp_safetensors(tmp_path / "other.safetensors", seed=1)
    r = submit(client, keys["alice"], other, headers=h)
    assert r.status_code == 422 and "Idempotency-Key" in r.text
    r = submit(client, keys["alice"], ckpt, spec=spec_json(seed=5), headers=h)
    assert r.status_code == 422


def test_idempotency_keys_are_per_caller(client, keys, ckpt):
    h = {"Idempotency-Key": "shared"}
    a = submit(client, keys["alice"], ckpt, headers=h).json()
    b = submit(client, keys["bob"], ckpt, headers=h).json()
    assert a["id"] != b["id"]


def test_oversize_declared_length_413(client, keys, tmp_path, settings):
    big = tmp_path / "big.bin"
    # Over the body cap: every file budget (checkpoints and evaluation set) plus the form overhead.
    big.write_bytes(b"\0" * (settings.max_upload_bytes + settings.max_eval_bytes + settings.form_overhead_bytes + 10))
    r = submit(client, keys["alice"], big)
    assert r.status_code == 413
    assert list((settings.data_dir / "tmp").iterdir()) == []


def test_oversize_streamed_without_length_413(client, keys, settings):
    # A chunked body has no Content-Length: the middleware counts bytes as they arrive.
    boundary = "XyZ"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"spec\"\r\n\r\n{spec_json()}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"checkpoint\"; filename=\"a\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    sent = []

    def body():
        yield head
        for _ in range(200):
            sent.append(1)
            yield b"\1" * 4096

    r = client.post("/v1/jobs", content=body(), headers={
        **auth(keys["alice"]), "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413


def test_file_just_over_limit_413(client, keys, tmp_path, settings):
    # Over the file limit but within the body allowance (file limits + form overhead): the evaluation set's
    # budget never lends room to the checkpoint.
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (settings.max_upload_bytes + 100))
    assert submit(client, keys["alice"], big).status_code == 413


@pytest.mark.parametrize("spec, needle", [
    ("{not json", "json"),
    (json.dumps({"config": {}}), "model"),
    (spec_json(config={"generator": {"steps": 10**9}}), "steps"),
    (spec_json(config={"distill": {"batch_size": 1}}), "batch_size"),
    (spec_json(model={**MLP_MODEL, "num_classes": 1}), "num_classes"),
    (spec_json(model={**MLP_MODEL, "input_shape": [1, 2]}), "input_shape"),
    (spec_json(model={**MLP_MODEL, "arch": "../../etc"}), "arch"),
    (spec_json(device="tpu"), "device"),
    (spec_json(surprise=1), "surprise"),
    (spec_json(config={"compression": {"quantize": "int4"}}), "quantize"),
    (spec_json(config={"compression": {"quantize": "int8"}, "export_onnx": False}), "export_onnx"),
])
def test_bad_spec_422(client, keys, ckpt, enqueued, spec, needle):
    r = submit(client, keys["alice"], ckpt, spec=spec)
    assert r.status_code == 422, r.text
    assert needle in r.text.lower()
    assert enqueued == []


def test_missing_fields_422(client, keys, ckpt):
    r = client.post("/v1/jobs", data={"spec": spec_json()}, headers=auth(keys["alice"]))
    assert r.status_code == 422 and "checkpoint" in r.text
    with ckpt.open("rb") as f:
        r = client.post("/v1/jobs", files={"checkpoint": f}, headers=auth(keys["alice"]))
    assert r.status_code == 422 and "spec" in r.text


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_with_code_refused_and_never_runs(client, keys, tmp_path, enqueued, settings, zip_format):
    marker = tmp_path / "PWNED"
    evil = write_evil_pickle(tmp_path / "evil.pt", marker, zip_format=zip_format)
    r = submit(client, keys["alice"], evil)
    assert r.status_code == 422, r.text
    assert "refused" in r.json()["detail"] or "could not be read" in r.json()["detail"]
    assert not marker.exists()
    assert enqueued == []
    assert list((settings.data_dir / "tmp").iterdir()) == []


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_empty_file_422(client, keys, tmp_path):
    r = submit(client, keys["alice"], _write(tmp_path / "e", b""))
    assert r.status_code == 422 and "empty" in r.json()["detail"]


def test_truncated_files_422(client, keys, tmp_path, ckpt):
    st = ckpt.read_bytes()
    r = submit(client, keys["alice"], _write(tmp_path / "t1", st[: len(st) // 2]))
    assert r.status_code == 422 and "truncated" in r.json()["detail"]
    pt = write_mlp_torch(tmp_path / "full.pt").read_bytes()
    r = submit(client, keys["alice"], _write(tmp_path / "t2", pt[: len(pt) // 2]))
    assert r.status_code == 422, r.text


def test_garbage_file_422(client, keys, tmp_path):
    r = submit(client, keys["alice"], _write(tmp_path / "g", b"hello, I am not a model" * 10))
    assert r.status_code == 422 and "neither" in r.json()["detail"]


def test_wrong_keys_422(client, keys, tmp_path):
    state = {("fc." + k): v for k, v in mlp_state().items()}
    r = submit(client, keys["alice"], write_mlp_torch(tmp_path / "w.pt", state))
    assert r.status_code == 422 and "missing keys" in r.json()["detail"]


def test_wrong_shapes_422(client, keys, ckpt):
    r = submit(client, keys["alice"], ckpt, spec=spec_json(model={**MLP_MODEL, "num_classes": 4}))
    assert r.status_code == 422 and "shape" in r.json()["detail"]


def test_nan_weights_accepted_by_the_api_refused_by_check_model(client, keys, tmp_path, enqueued):
    """NaN weights are only seen by reading the weights: the API (check_static) queues the job, and the
    worker's validate stage (preflight.check_model) fails it with the message the API used to give."""
    from kegnet import preflight
    from kegnet.errors import KegnetError
    from kegnet.spec import ModelSpec

    state = mlp_state()
    state["head.weight"][0, 0] = math.nan
    path = write_mlp_torch(tmp_path / "n.pt", state)
    assert submit(client, keys["alice"], path).status_code == 202
    request = json.loads(spec_json())
    with pytest.raises(KegnetError, match="NaN"):
        preflight.check_model([path], ModelSpec.model_validate(request["model"]), _config(request),
                              preflight.Limits())


def _config(request: dict):
    from kegnet.config import ClassifierConfig

    return ClassifierConfig.model_validate(request["config"])


def test_unknown_arch_422(client, keys, ckpt):
    r = submit(client, keys["alice"], ckpt, spec=spec_json(model={**MLP_MODEL, "arch": "vgg99"}))
    assert r.status_code == 422 and "unknown architecture" in r.json()["detail"]


def test_non_tensor_entries_422(client, keys, tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"a": 1, "b": "text"}, path)
    assert submit(client, keys["alice"], path).status_code == 422


def test_per_key_cap_429(client, keys, ckpt, settings):
    for _ in range(settings.max_active_jobs_per_key):
        assert submit(client, keys["alice"], ckpt).status_code == 202
    r = submit(client, keys["alice"], ckpt)
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    # another key is not affected by alice's cap
    assert submit(client, keys["bob"], ckpt).status_code == 202


def test_global_queue_cap_429(client, keys, ckpt, settings, redis_db):
    from service.keys import KeyStore

    ks = KeyStore(redis_db, settings.key_prefix)
    for i in range(settings.max_queued_jobs):
        assert submit(client, ks.create(f"u{i}")[1], ckpt).status_code == 202
    r = submit(client, keys["alice"], ckpt)
    assert r.status_code == 429 and "queue is full" in r.text


def test_cancelled_job_frees_the_cap(client, keys, ckpt, settings):
    ids = [submit(client, keys["alice"], ckpt).json()["id"] for _ in range(settings.max_active_jobs_per_key)]
    assert submit(client, keys["alice"], ckpt).status_code == 429
    r = client.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth(keys["alice"]))
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    assert submit(client, keys["alice"], ckpt).status_code == 202


def test_queue_unavailable_503(settings, keys, ckpt):
    from fastapi.testclient import TestClient

    from service.app import create_app

    def broken(job_id: str) -> None:
        raise ConnectionError("broker down")

    with TestClient(create_app(settings, enqueue=broken, run_reaper=False)) as c:
        r = submit(c, keys["alice"], ckpt)
        assert r.status_code == 503
        jobs = c.get("/v1/jobs", headers=auth(keys["alice"])).json()["jobs"]
        assert jobs[0]["status"] == "failed"
