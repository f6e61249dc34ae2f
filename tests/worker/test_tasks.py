"""``run_job``: the task body, run in this process with the real pipeline on a tiny MLP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jobs.settings import Settings
from jobs.storage import LocalStorage
from jobs.store import QUEUED, JobStore
from tests.service.svc_helpers import (
    MLP_MODEL,
    REDIS_TEST_URL,
    TINY_CONFIG,
    write_eval_set,
    write_mlp_safetensors,
)
from worker.files import SharedVolume
from worker.tasks import resolve_device, run_job


@pytest.fixture
def env(tmp_path: Path, redis_db):
    settings = Settings(redis_url=REDIS_TEST_URL, data_dir=tmp_path / "data", heartbeat_interval_s=0.2,
                        progress_write_interval_s=0)
    return settings, JobStore.from_url(REDIS_TEST_URL), LocalStorage(settings.data_dir)


def make_job(env, tmp_path: Path, config: dict | None = None) -> str:
    settings, store, storage = env
    request = {"model": MLP_MODEL, "config": config or TINY_CONFIG, "seed": 0, "device": "auto"}
    job = store.create("alice", request, sha256="0" * 64, size=1, request_hash="h")
    write_mlp_safetensors(tmp_path / "t.safetensors")
    storage.commit_checkpoint(tmp_path / "t.safetensors", job["id"])
    return job["id"]


def test_success_records_artifacts_metrics_and_events(env, tmp_path):
    settings, store, storage = env
    job_id = make_job(env, tmp_path)
    assert run_job(job_id, store, SharedVolume(storage), settings) == "succeeded"
    job = store.get(job_id)
    assert job["status"] == "succeeded" and job["progress"] == 1.0 and job["error"] == ""
    assert {"student.safetensors", "student.pt2", "manifest.json"} <= set(job["artifacts"])
    assert job["metrics"]["compression_ratio"] > 1 and job["metrics"]["device"] == "cpu"
    events = store.events(job_id)
    assert events[0]["status"] == "queued" and events[-1]["status"] == "succeeded"
    assert any(e["type"] == "progress" and e["stage"] == "finetune" for e in events)
    manifest = json.loads((storage.out_dir(job_id) / "manifest.json").read_text())
    assert manifest["spec"]["arch"] == "mlp"
    program = torch.export.load(storage.out_dir(job_id) / "student.pt2")  # our own output: trusted
    assert program.module()(torch.randn(4, 8)).shape == (4, 3)
    assert store.active_count() == 0


def test_cancel_flag_stops_the_pipeline(env, tmp_path):
    settings, store, storage = env
    job_id = make_job(env, tmp_path, {**TINY_CONFIG, "generator": {"num_generators": 1, "steps": 2000}})
    store.r.hset(f"{store.p}:job:{job_id}", "cancel_requested", "1")  # set before the first check
    assert run_job(job_id, store, SharedVolume(storage), settings) == "cancelled"
    assert store.get(job_id)["status"] == "cancelled"


def test_user_error_becomes_failed_with_message(env, tmp_path):
    settings, store, storage = env
    config = {**TINY_CONFIG, "compression": {"layers": ["no_such_layer"]}}
    job_id = make_job(env, tmp_path, config)
    assert run_job(job_id, store, SharedVolume(storage), settings) == "failed"
    assert "no_such_layer" in store.get(job_id)["error"]


def test_job_not_queued_is_skipped(env, tmp_path):
    settings, store, storage = env
    job_id = make_job(env, tmp_path)
    store.request_cancel(job_id)
    assert run_job(job_id, store, SharedVolume(storage), settings) == "cancelled"
    assert run_job("f" * 32, store, SharedVolume(storage), settings) == "missing"


def test_soft_time_limit_is_a_clear_failure(env, tmp_path, monkeypatch):
    from celery.exceptions import SoftTimeLimitExceeded

    import kegnet.pipeline

    def slow(*args, **kwargs):
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(kegnet.pipeline, "run_pipeline", slow)
    settings, store, storage = env
    job_id = make_job(env, tmp_path)
    assert run_job(job_id, store, SharedVolume(storage), settings) == "failed"
    assert "time limit" in store.get(job_id)["error"]


def test_soft_time_limit_inside_the_int8_step_still_fails_the_job(env, tmp_path, monkeypatch):
    """The int8 step keeps the fp32 job when its quantizer fails; Celery's soft time limit must not count as
    such a failure (the worker names it to run_pipeline as an interrupt)."""
    from celery.exceptions import SoftTimeLimitExceeded

    from kegnet.compression import quantize

    def slow(*args, **kwargs):
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(quantize, "best_int8", slow)
    settings, store, storage = env
    config = {**TINY_CONFIG, "compression": {**TINY_CONFIG.get("compression", {}), "quantize": "int8"}}
    job_id = make_job(env, tmp_path, config)
    assert run_job(job_id, store, SharedVolume(storage), settings) == "failed"
    assert "time limit" in store.get(job_id)["error"]


def test_crash_is_failed_without_internals(env, tmp_path, monkeypatch):
    import kegnet.pipeline

    def boom(*args, **kwargs):
        raise RuntimeError("/secret/server/path exploded")

    monkeypatch.setattr(kegnet.pipeline, "run_pipeline", boom)
    settings, store, storage = env
    job_id = make_job(env, tmp_path)
    assert run_job(job_id, store, SharedVolume(storage), settings) == "failed"
    assert "/secret" not in store.get(job_id)["error"]


def test_device_resolution():
    import pytest
    import torch

    from kegnet.errors import KegnetError

    assert str(resolve_device("cpu")) == "cpu"
    assert str(resolve_device("auto")) in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(KegnetError, match="no GPU"):
            resolve_device("cuda")


def test_celery_settings_follow_the_reference():
    from worker.celery_app import app

    c = app.conf
    assert c.task_acks_late is False and c.worker_prefetch_multiplier == 1
    assert c.worker_disable_prefetch is True and c.worker_max_tasks_per_child == 1
    assert c.task_serializer == "json" and c.accept_content == ["json"]
    assert c.task_soft_time_limit < c.task_time_limit
    assert c.task_routes["worker.tasks.compress_job"]["queue"] == "gpu"
    assert not torch.cuda.is_initialized()  # importing the worker must not touch CUDA
    assert QUEUED == "queued"


def test_several_checkpoints_run_as_a_teacher_ensemble(env, tmp_path):
    settings, store, storage = env
    config = {**TINY_CONFIG, "distill": {**TINY_CONFIG["distill"], "ensemble_weighting": "entropy"}}
    request = {"model": MLP_MODEL, "config": config, "seed": 0, "device": "cpu"}
    files = [{"sha256": str(i) * 64, "size": 1} for i in range(2)]
    job = store.create("alice", request, sha256=files[0]["sha256"], size=1, request_hash="h", checkpoints=files)
    for i in range(2):
        write_mlp_safetensors(tmp_path / f"t{i}.safetensors", seed=i)
        storage.commit_checkpoint(tmp_path / f"t{i}.safetensors", job["id"], i)
    assert run_job(job["id"], store, SharedVolume(storage), settings) == "succeeded", store.get(job["id"])["error"]
    manifest = json.loads((storage.out_dir(job["id"]) / "manifest.json").read_text())
    assert manifest["classify"]["teachers"]["count"] == 2 and manifest["classify"]["teachers"]["weighting"] == "entropy"
    assert store.get(job["id"])["metrics"]["teachers"] == 2


def test_worker_applies_the_upload_budget_to_stored_files(env, tmp_path):
    """The worker checks each stored file against the service's budget before the pipeline reads it."""
    settings, store, storage = env
    settings = settings.model_copy(update={"max_upload_bytes": 1024})
    job_id = make_job(env, tmp_path)  # a 1,068-byte safetensors file, over a 1,024-byte budget
    assert run_job(job_id, store, SharedVolume(storage), settings) == "failed"
    assert "above this service's limit of 1,024" in store.get(job_id)["error"]


def test_eval_set_and_confidence_reach_the_job_metrics(env, tmp_path):
    settings, store, storage = env
    eval_file = write_eval_set(tmp_path / "eval.safetensors")  # labels: the teacher's own predictions
    request = {"model": MLP_MODEL, "config": TINY_CONFIG, "seed": 0, "device": "cpu"}
    job = store.create("alice", request, sha256="0" * 64, size=1, request_hash="h",
                       eval_set={"sha256": "1" * 64, "size": eval_file.stat().st_size})
    storage.commit_checkpoint(write_mlp_safetensors(tmp_path / "t.safetensors"), job["id"])
    storage.commit_eval_set(eval_file, job["id"])
    assert run_job(job["id"], store, SharedVolume(storage), settings) == "succeeded", store.get(job["id"])["error"]
    metrics = store.get(job["id"])["metrics"]
    manifest = json.loads((storage.out_dir(job["id"]) / "manifest.json").read_text())
    assert metrics["recipe"] == manifest["classify"]["recipe"] and metrics["recipe"]
    assert metrics["confidence_estimate"] == manifest["classify"]["confidence"]["estimate"]
    assert 0 <= metrics["confidence_estimate"] <= 1
    assert metrics["confidence_level"] in ("high", "medium", "low")
    assert metrics["confidence_warnings"] == manifest["classify"]["confidence"]["warnings"]
    assert metrics["eval_samples"] == 60 and metrics["eval_teacher_accuracy"] == 1.0
    assert metrics["eval_student_accuracy"] == manifest["classify"]["evaluation"]["student_accuracy"]
    assert 0 <= metrics["eval_student_accuracy"] <= 1


def test_a_job_without_eval_set_passes_none_and_reports_no_eval_metrics(env, tmp_path, monkeypatch):
    import kegnet.pipeline
    from kegnet.errors import KegnetError
    from kegnet.report import ClassifyReport, RunReport, Sizes, Speed

    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise KegnetError("stop here")

    monkeypatch.setattr(kegnet.pipeline, "run_pipeline", record)
    settings, store, storage = env
    assert run_job(make_job(env, tmp_path), store, SharedVolume(storage), settings) == "failed"
    assert seen["eval_set"] is None and seen["max_eval_samples"] == settings.max_eval_samples
    section = ClassifyReport(plan={"layers": [], "skipped": {}}, macs=Sizes(teacher=2, student=1),
                             confidence={"estimate": 0.5, "level": "low", "warnings": ["low estimate: ..."]})
    report = RunReport(task="classify", spec={}, architecture={}, config={}, seed=0, device="cpu",
                       parameters=Sizes(teacher=2, student=1), compression_ratio=2.0,
                       speed=Speed(device="cpu", unit="ms", teacher={}, student={}), classify=section)
    summary = report.summary()
    assert not {"eval_samples", "eval_teacher_accuracy", "eval_student_accuracy", "recipe"} & set(summary)
    assert {k: summary[k] for k in ("confidence_estimate", "confidence_level", "confidence_warnings")} == {
        "confidence_estimate": 0.5, "confidence_level": "low", "confidence_warnings": ["low estimate: ..."]}
