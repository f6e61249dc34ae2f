"""A Redis restart, with real processes: a private ``redis-server`` (append-only file on) that the test stops
and starts again while a worker and the API use it. Jobs finished before survive; a running job finishes;
the API answers 503 (not 500) while Redis is away; the worker takes new jobs afterwards."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from kegnet.client import KegnetClient
from tests.integration.conftest import Stack, free_port
from tests.service.svc_helpers import MLP_MODEL, TINY_CONFIG, write_mlp_safetensors

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed"),
]

# Long enough (several seconds on one CPU thread) to stop and restart Redis while it runs.
SLOW_CONFIG = {**TINY_CONFIG, "generator": {"num_generators": 1, "steps": 3000, "batch_size": 64}}


class PrivateRedis:
    """``redis-server`` on a free port, persisting to an append-only file in ``dir`` (as in production)."""

    def __init__(self, directory: Path) -> None:
        self.dir, self.port = directory, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(self.port),
                        "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                        "--maxmemory-policy", "noeviction", "--logfile", str(self.dir / "redis.log")], check=True)
        client = redis.Redis.from_url(self.url)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("private redis did not start")

    def stop(self) -> None:
        # SHUTDOWN flushes the append-only file, as a container stop does with appendonly on.
        with contextlib.suppress(redis.ConnectionError):  # the server closes the connection as it exits
            redis.Redis.from_url(self.url).shutdown(nosave=False)
        client = redis.Redis.from_url(self.url)
        for _ in range(100):
            try:
                client.ping()
                time.sleep(0.05)
            except redis.ConnectionError:
                return
        raise RuntimeError("private redis did not stop")


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PrivateRedis, Stack, str]]:
    tmp = tmp_path_factory.mktemp("redis-restart")
    server = PrivateRedis(tmp)
    server.start()
    stack = Stack(tmp, redis_url=server.url)
    try:
        stack.start_worker()
        stack.start_api()
        stack.wait_ready()
        from service.keys import KeyStore

        key = KeyStore(redis.Redis.from_url(server.url, decode_responses=True)).create("restart")[1]
        yield server, stack, key
    finally:
        stack.close()
        server.stop()


def test_redis_restart_loses_nothing(private, tmp_path: Path) -> None:
    server, stack, key = private
    teacher = write_mlp_safetensors(tmp_path / "teacher.safetensors")
    with KegnetClient(stack.url, key) as client:
        finished = client.wait(client.submit(teacher, MLP_MODEL, TINY_CONFIG)["id"], timeout=90, poll=0.3,
                               progress=False)
        assert finished["status"] == "succeeded", stack.logs()

        running = client.submit(teacher, MLP_MODEL, SLOW_CONFIG)
        deadline = time.monotonic() + 60
        while client.status(running["id"])["progress"] <= 0.02:
            assert time.monotonic() < deadline, stack.logs()
            time.sleep(0.2)

        stopped_at = time.time()
        server.stop()
        # While the store is away the API says so, with a retry hint, instead of failing with a 500.
        r = httpx.get(f"{stack.url}/v1/jobs/{running['id']}", headers={"Authorization": f"Bearer {key}"},
                      timeout=30)
        assert r.status_code == 503 and "retry-after" in r.headers
        assert httpx.get(f"{stack.url}/readyz", timeout=30).status_code == 503
        time.sleep(2)
        server.start()

        # The finished job and its files are still there.
        again = client.status(finished["id"])
        assert again["status"] == "succeeded" and again["artifacts"] == finished["artifacts"]
        assert client.download(finished["id"], tmp_path / "before", ["manifest.json"])
        # The running job carried on through the outage and finished.
        done = client.wait(running["id"], timeout=180, poll=0.5, progress=False)
        assert done["status"] == "succeeded", (done, stack.logs())
        assert done["finished_at"] > stopped_at  # it was mid-run when Redis went away
        # The worker reconnected to the broker: a new job runs.
        nxt = client.wait(client.submit(teacher, MLP_MODEL, TINY_CONFIG)["id"], timeout=120, poll=0.3,
                          progress=False)
        assert nxt["status"] == "succeeded", stack.logs()
