"""Faults of a remote worker's uploads, with real processes: a Celery worker (``KEGNET_API_URL``, no shared
volume) killed mid-upload leaves its job failed by the reaper and no partial artifact; an API killed
mid-upload is retried into a whole artifact once it is back."""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from pathlib import Path

import httpx

from jobs import credentials
from jobs.reaper import LOST
from jobs.settings import Settings
from jobs.storage import LocalStorage
from jobs.store import JobStore
from service.keys import KeyStore
from tests.integration.conftest import Stack
from tests.service.svc_helpers import REDIS_TEST_URL, auth, spec_json, write_mlp_safetensors
from tests.worker.test_remote import submitted
from worker.files import OverHttp
from worker.tasks import run_job

SECRET = "f" * 40
RATE = 4096  # bytes/s: the 53 kB curves.png, uploaded first, takes ~13 s


def wait(what: str, probe, timeout: float = 120, stack: Stack | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}" + (f"; logs:\n{stack.logs()}" if stack else ""))


def no_partial(data: Path, job_id: str, name: str) -> None:
    assert list((data / "tmp").glob("*.part")) == [], "a temp upload was left behind"
    assert not (data / "jobs" / job_id / "out" / name).exists(), f"{name} was half uploaded but is there"


def test_a_worker_killed_during_its_upload_leaves_the_job_failed_and_no_partial_file(tmp_path, redis_db):
    stack = Stack(tmp_path)
    api_env = {**stack.env, "KEGNET_WORKER_SECRET": SECRET}
    # The worker: the API's address, the secret, a slow link; and a data dir of its own that must never be
    # made (LocalStorage would create it): it never opens storage in this mode.
    stack.env = {**api_env, "KEGNET_API_URL": stack.url, "KEGNET_TRANSFER_RATE_BYTES_S": str(RATE),
                 "KEGNET_DATA_DIR": str(tmp_path / "worker-must-not-make-this")}
    try:
        stack.start_worker()
        stack.env = api_env
        stack.start_api()
        stack.wait_ready()
        key = KeyStore(redis_db).create("faults")[1]
        teacher = write_mlp_safetensors(tmp_path / "t.safetensors")
        with teacher.open("rb") as f:
            r = httpx.post(f"{stack.url}/v1/jobs", files={"checkpoint": f}, data={"spec": spec_json()},
                           headers=auth(key), timeout=30)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        status = lambda: httpx.get(f"{stack.url}/v1/jobs/{job_id}", headers=auth(key), timeout=10).json()  # noqa: E731
        wait("the upload stage", lambda: status()["stage"] == "upload", stack=stack)
        time.sleep(2)  # into curves.png
        Stack.stop(stack.worker, signal.SIGKILL)
        job = wait("the reaper", lambda: (j := status())["status"] == "failed" and j, stack=stack)
        assert job["error"] == LOST and job["artifacts"] == []
        wait("the API to see the cut", lambda: "interrupted" in stack.logs(), timeout=20, stack=stack)
        assert f"upload of {job_id}/curves.png interrupted" in stack.logs()
        no_partial(tmp_path / "data", job_id, "curves.png")
        assert not (tmp_path / "worker-must-not-make-this").exists()
    finally:
        stack.close()


def test_an_api_killed_during_an_upload_is_retried_into_a_whole_artifact(tmp_path, redis_db):
    stack = Stack(tmp_path)
    stack.env.update(KEGNET_WORKER_SECRET=SECRET, KEGNET_HEARTBEAT_STALE_S="120")
    settings = Settings(redis_url=REDIS_TEST_URL, data_dir=tmp_path / "data", heartbeat_interval_s=0.5,
                        api_url=stack.url, worker_secret=SECRET, transfer_rate_bytes_s=RATE, transfer_attempts=8)
    store, storage = JobStore.from_url(REDIS_TEST_URL), LocalStorage(settings.data_dir)
    job_id = submitted(store, storage, tmp_path)
    files = OverHttp(stack.url, credentials.mint(SECRET, job_id, 3600), settings)
    outcome: list[str] = []
    try:
        stack.start_api()
        worker = threading.Thread(target=lambda: outcome.append(run_job(job_id, store, files, settings)))
        worker.start()
        wait("the upload stage", lambda: store.get(job_id)["stage"] == "upload", stack=stack)
        time.sleep(2)
        Stack.stop(stack.api, signal.SIGKILL)
        assert list((settings.data_dir / "tmp").glob("*.part")), "the kill did not land mid-upload"
        stack.start_api()
        worker.join(timeout=300)
        assert outcome == ["succeeded"], store.get(job_id)["error"]
        for name, info in store.get(job_id)["artifacts"].items():
            data = (storage.out_dir(job_id) / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == info["sha256"], name
        # The dead API's half-written temp file goes once its liveness key expires (jobs/instances.py).
        wait("the orphaned upload to be removed", lambda: not list((settings.data_dir / "tmp").glob("*.part")),
             timeout=60, stack=stack)
    finally:
        stack.close()

