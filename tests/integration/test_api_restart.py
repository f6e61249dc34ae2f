"""A real API process killed with SIGKILL mid-upload, then restarted: nothing it held is left behind (issue 20,
part 3): no ``.part`` file, no reservation (the key's one slot is free), and its Idempotency-Key usable at once."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
from safetensors.torch import save_file

from jobs.store import JobStore
from kegnet.models import create_model
from service.keys import KeyStore
from tests.integration.conftest import Stack
from tests.service.svc_helpers import REDIS_TEST_URL, auth, spec_json, write_mlp_safetensors

BIG = {"arch": "mlp", "arch_kwargs": {"hidden": [4096]}, "input_shape": [4096], "num_classes": 3}


def _big_checkpoint(path: Path) -> Path:
    """~67 MB: an upload that takes a while to stream into the API's ``tmp/``."""
    model = create_model("mlp", input_shape=(4096,), num_classes=3, hidden=[4096])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _submit_in_background(url: str, key: str, path: Path) -> threading.Thread:
    def post() -> None:
        # The API dies under it.
        with path.open("rb") as f, httpx.Client(timeout=120) as c, contextlib.suppress(httpx.HTTPError):
            c.post(f"{url}/v1/jobs", files={"checkpoint": f}, data={"spec": spec_json(model=BIG)},
                   headers={**auth(key), "Idempotency-Key": "nightly-7"})

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    return thread


def _freeze_in_checks(api: subprocess.Popen, store: JobStore, owner: str, timeout: float = 60) -> None:
    """Stop the API (SIGSTOP) the moment its request claims the Idempotency-Key: the upload is then saved to
    ``tmp/`` and the request is in its checks. The checks read no weights and take milliseconds, so this
    polls without sleeping (a poll every 10 ms missed them on a busy CI machine)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if store.idempotency_get(owner, "nightly-7"):
            os.killpg(api.pid, signal.SIGSTOP)
            return
    raise AssertionError("the upload never reached the API's checks")


@pytest.fixture
def api_only(tmp_path: Path, redis_db: redis.Redis):
    s = Stack(tmp_path)
    s.env.update({"KEGNET_MAX_UPLOAD_BYTES": str(128 * 1024 * 1024), "KEGNET_MAX_ACTIVE_JOBS_PER_KEY": "1",
                  "KEGNET_RESERVATION_TTL_S": "900"})
    try:
        yield s
    finally:
        s.close()


def test_api_killed_mid_upload_leaves_nothing_held_after_restart(api_only, redis_db, tmp_path):
    key = KeyStore(redis_db).create("restart")[1]
    owner = KeyStore(redis_db).lookup(key)
    store = JobStore.from_url(REDIS_TEST_URL)
    tmp = tmp_path / "data" / "tmp"
    api_only.start_api()
    thread = _submit_in_background(api_only.url, key, _big_checkpoint(tmp_path / "big.safetensors"))
    _freeze_in_checks(api_only.api, store, owner)
    Stack.stop(api_only.api, signal.SIGKILL)
    thread.join(30)
    assert list(tmp.glob("*.part")) and store.reserved_count(owner) == 1  # what the probe found held

    started = time.monotonic()
    api_only.start_api()
    assert list(tmp.glob("*.part")) == []
    assert store.reserved_count(owner) == 0 and store.idempotency_get(owner, "nightly-7") is None
    small = write_mlp_safetensors(tmp_path / "small.safetensors")
    with small.open("rb") as f:  # the key and the key's one slot, at once
        r = httpx.post(f"{api_only.url}/v1/jobs", files={"checkpoint": f}, data={"spec": spec_json()},
                       headers={**auth(key), "Idempotency-Key": "nightly-7"}, timeout=60)
    assert r.status_code == 202, r.text
    assert time.monotonic() - started < 30  # not the 900 s reservation_ttl_s
