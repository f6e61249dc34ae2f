"""Integration: a real ``celery worker -P prefork -c 1`` and a real uvicorn, on Redis DB 15."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.service.svc_helpers import REDIS_TEST_URL

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """Starts and stops the API and the worker as separate processes, like production."""

    def __init__(self, tmp: Path, redis_url: str = REDIS_TEST_URL) -> None:
        self.tmp = tmp
        self.redis_url = redis_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "KEGNET_REDIS_URL": redis_url,
            "KEGNET_DATA_DIR": str(tmp / "data"),
            "KEGNET_MAX_UPLOAD_BYTES": str(4 * 1024 * 1024),
            "KEGNET_MAX_ACTIVE_JOBS_PER_KEY": "10",
            "KEGNET_HEARTBEAT_INTERVAL_S": "0.5",
            "KEGNET_HEARTBEAT_STALE_S": "8",
            "KEGNET_REAPER_INTERVAL_S": "1",
            "KEGNET_PROGRESS_WRITE_INTERVAL_S": "0.2",
            "CUDA_VISIBLE_DEVICES": "",
            # One thread per job: 2 shared cores, where oversubscribed torch threads crawl.
            "KEGNET_TORCH_THREADS": "1",
            "OMP_NUM_THREADS": "1",
        }
        self.api: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen:
        out = (self.tmp / log).open("ab")
        # Own process group so a test can stop the worker and all its children.
        return subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def start_api(self) -> None:
        self.api = self._spawn([sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1",
                                "--port", str(self.port), "--log-level", "warning"], "api.log")
        self._wait(lambda: httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200, "api")

    def start_worker(self) -> None:
        self.worker = self._spawn([sys.executable, "-m", "celery", "-A", "worker.celery_app:app", "worker",
                                   "-P", "prefork", "-c", "1", "-Q", "gpu", "--loglevel", "INFO",
                                   "-n", f"test-{uuid.uuid4().hex[:6]}@%h", "--without-gossip",
                                   "--without-mingle"], "worker.log")

    def wait_ready(self) -> None:
        self._wait(lambda: httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200, "worker")

    def _wait(self, check, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{what} did not start; logs in {self.tmp}:\n" + self.logs())

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in self.tmp.glob("*.log"))

    @staticmethod
    def stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def stop_api(self) -> None:
        self.stop(self.api)

    def close(self) -> None:
        self.stop(self.api)
        self.stop(self.worker)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    client = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip(f"redis is not running at {REDIS_TEST_URL}")
    client.flushdb()
    s = Stack(tmp_path_factory.mktemp("stack"))
    try:
        s.start_worker()
        s.start_api()
        s.wait_ready()
        yield s
    finally:
        s.close()
        client.flushdb()


@pytest.fixture(scope="module")
def api_key(stack: Stack) -> str:
    from service.keys import KeyStore

    return KeyStore(redis.Redis.from_url(REDIS_TEST_URL, decode_responses=True)).create("integration")[1]
