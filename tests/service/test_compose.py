"""docker-compose.yml keeps the settings the reference calls for (GPU reservation, Redis durability...)."""

from __future__ import annotations

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_worker_reserves_one_gpu(compose):
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "device_ids" not in devices[0]  # count or device_ids, not both


def test_worker_command_is_exec_form_prefork_single(compose):
    worker = compose["services"]["worker"]
    cmd = worker["command"]
    assert isinstance(cmd, list) and cmd[:2] == ["celery", "-A"]
    assert cmd[cmd.index("-P") + 1] == "prefork" and cmd[cmd.index("-c") + 1] == "1"
    assert worker["init"] is True
    grace = worker["stop_grace_period"]
    assert grace.endswith("m") or int(grace.rstrip("s")) > 10


def test_redis_is_durable_and_never_evicts(compose):
    redis = compose["services"]["redis"]
    cmd = " ".join(redis["command"]) if isinstance(redis["command"], list) else redis["command"]
    assert "--appendonly yes" in cmd
    assert "--maxmemory-policy noeviction" in cmd
    assert "healthcheck" in redis


def test_healthchecks_and_shared_volume(compose):
    services = compose["services"]
    for name in ("redis", "api", "worker"):
        assert services[name]["healthcheck"]["test"], name
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    assert services["api"]["volumes"] == services["worker"]["volumes"]
    assert services["api"]["env_file"] == services["worker"]["env_file"] == ".env"
    assert services["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_env_example_names_real_settings():
    from service.settings import Settings

    names = {line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text().splitlines()
             if line and not line.startswith("#")}
    fields = {f"KEGNET_{n.upper()}" for n in Settings.model_fields}
    assert names <= fields, names - fields
