"""The whole job's cost is refused before queueing (kegnet/cost.py); that the default limits admit real
workloads is tests/jobs/test_settings.py."""

from __future__ import annotations

import json

import torch

from kegnet.models import create_model
from tests.service.svc_helpers import auth, spec_json


def test_reported_job_is_refused_before_queueing(client, keys, tmp_path, enqueued, redis_db):
    """The issue's job: a tiny teacher on 16x512x512, 16 generators x batch 2,048 x 200,000 steps."""
    model = {"arch": "resnet", "arch_kwargs": {"depth": 8, "widths": [2, 2, 2]}, "input_shape": [16, 512, 512],
             "num_classes": 10}
    path = tmp_path / "tiny.pt"
    torch.save(create_model("resnet", input_shape=(16, 512, 512), num_classes=10, depth=8,
                            widths=[2, 2, 2]).state_dict(), path)
    config = {"generator": {"num_generators": 16, "batch_size": 2048, "steps": 200_000}}
    r = client.post("/v1/jobs", headers=auth(keys["alice"]),
                    files={"checkpoint": ("t.pt", path.read_bytes())}, data={"spec": spec_json(model, config)})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "GiB of memory in generator training" in detail and "config.generator.batch_size" in detail
    assert enqueued == []
    assert client.get("/v1/jobs", headers=auth(keys["alice"])).json()["jobs"] == []
    # Nothing held: the same teacher with a small config is accepted.
    small = {"generator": {"num_generators": 1, "batch_size": 2, "steps": 1},
             "distill": {"steps": 1, "batch_size": 2, "holdout_samples": 64, "eval_every": 1},
             "compression": {"keep_slower": True, "latency_repeats": 3, "latency_budget_s": 0.01}}
    r = client.post("/v1/jobs", headers=auth(keys["alice"]),
                    files={"checkpoint": ("t.pt", path.read_bytes())}, data={"spec": spec_json(model, small)})
    assert r.status_code == 202, r.text
    assert json.loads(r.text)["status"] == "queued"


def test_sequence_job_over_the_limit_is_refused_with_its_knobs(settings, keys, tmp_path, enqueued):
    from fastapi.testclient import TestClient
    from safetensors.torch import save_file

    from kegnet.models import create_model
    from service.app import create_app

    kwargs = {"n_layers": 1, "d_model": 32, "n_heads": 2}
    model = {"arch": "transformer", "arch_kwargs": kwargs, "task": "sequence",
             "sequence": {"vocab_size": 16, "max_length": 10, "bos_id": 1, "eos_id": 2, "pad_id": 0}}
    path = tmp_path / "lm.safetensors"
    save_file(create_model("transformer", vocab_size=16, max_length=10, **kwargs).state_dict(), str(path))
    tight = settings.model_copy(update={"max_job_macs": 1e11})
    with TestClient(create_app(tight, enqueue=enqueued.append, run_reaper=False)) as client:
        def submit(config: dict) -> object:
            return client.post("/v1/jobs", headers=auth(keys["alice"]),
                               files={"checkpoint": ("lm.safetensors", path.read_bytes())},
                               data={"spec": spec_json(model, config)})

        r = submit({"sequence": {"samples": 500_000, "beam_size": 16}})
        assert r.status_code == 422, r.text
        assert "mostly in the teacher's generations, above this service's limit" in r.json()["detail"]
        assert "; lower config.sequence.samples" in r.json()["detail"]
        r = submit({"sequence": {"samples": 256, "holdout": 16, "student_layers": 2}})
        assert r.status_code == 422, r.text
        assert "config.sequence: student_layers must be an integer in 1..1 (the teacher's blocks)" in r.json()["detail"]
        r = submit({"sequence": {"samples": 256, "holdout": 16, "steps": 10, "beam_size": 2}})
        assert r.status_code == 202, r.text
    assert len(enqueued) == 1
