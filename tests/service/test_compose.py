"""docker-compose.yml keeps the settings the reference calls for (GPU reservation, Redis durability...), the CPU
override only moves the GPU worker behind a profile, and the Dockerfile's build context holds what it copies.

These read the files; ``bash scripts/compose-smoke.sh`` runs them (README "The service")."""

from __future__ import annotations

import re
import shutil
import subprocess
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


def test_healthchecks_and_env(compose):
    services = compose["services"]
    for name in ("redis", "api", "worker"):
        assert services[name]["healthcheck"]["test"], name
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    assert services["api"]["env_file"] == services["worker"]["env_file"] == "${KEGNET_ENV_FILE:-.env}"
    assert services["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_workers_share_no_volume_with_the_api_and_reach_only_redis_and_it(compose):
    """The API owns the job files; the workers fetch and return them over HTTP (README "Workers on other
    hosts"), on an internal network that holds only Redis, the API and themselves (and Flower)."""
    services = compose["services"]
    assert services["api"]["volumes"] == ["kegnet-data:/data"]
    for name in ("worker", "worker-cpu"):
        worker = services[name]
        assert "volumes" not in worker, name
        assert worker["environment"]["KEGNET_API_URL"] == "http://api:8000"
        assert worker["networks"] == ["backend"]
    assert compose["networks"]["backend"] == {"internal": True}
    on_backend = {n for n, svc in services.items() if "backend" in svc.get("networks", [])}
    assert on_backend == {"redis", "api", "worker", "worker-cpu", "flower"}
    assert not any("kegnet-data:/data" in svc.get("volumes", []) for n, svc in services.items() if n != "api")


def test_env_example_names_real_settings():
    from jobs.settings import Settings

    names = {line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text().splitlines()
             if line and not line.startswith("#")}
    fields = {f"KEGNET_{n.upper()}" for n in Settings.model_fields}
    assert names <= fields, names - fields


def test_cpu_worker_is_the_worker_without_the_gpu(compose):
    services = compose["services"]
    gpu, cpu = dict(services["worker"]), dict(services["worker-cpu"])
    assert cpu.pop("profiles") == ["cpu"] and "deploy" not in cpu
    gpu.pop("deploy")
    assert "profiles" not in gpu  # plain `docker compose up` on a GPU host starts the GPU worker
    assert cpu == gpu


def test_cpu_override_only_moves_the_gpu_worker_behind_a_profile():
    override = yaml.safe_load((ROOT / "docker-compose.cpu.yml").read_text())
    assert override == {"services": {"worker": {"profiles": ["gpu"]}}}


def test_images_are_overridable_with_public_defaults(compose):
    services = compose["services"]
    assert services["redis"]["image"] == "${KEGNET_REDIS_IMAGE:-redis:7.4-alpine}"
    assert "--dir" in services["redis"]["command"]  # the AOF lands in the volume whatever the image's workdir
    assert "ports" not in services["redis"]  # protected mode is off: only the compose network reaches it
    assert services["api"]["build"]["args"]["BASE_IMAGE"] == "${KEGNET_BASE_IMAGE:-python:3.11-slim}"
    assert services["api"]["image"] == services["worker"]["image"] == services["worker-cpu"]["image"]


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_dockerfile_base_is_a_build_arg_and_the_runtime_is_not_root():
    text = _dockerfile()
    assert text.index("ARG BASE_IMAGE=python:3.11-slim") < text.index("FROM ")
    assert all(line.split()[1] == "${BASE_IMAGE}" for line in text.splitlines() if line.startswith("FROM "))
    assert 'index="--no-index --find-links /wheels"' in text
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users == ["kegnet"]


def test_build_context_holds_everything_the_dockerfile_copies():
    """.dockerignore is an allow-list: a COPY source left off it would fail the build (or copy nothing)."""
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    sources = []
    for line in _dockerfile().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    assert sources
    for src in sources:
        assert src.rstrip("/") in allowed, src
        assert (ROOT / src).exists(), src


def test_requirements_script_lists_the_pins_and_refuses_unknown_extras():
    script = ROOT / "scripts" / "requirements.py"
    out = subprocess.run(["python3", str(script), str(ROOT / "pyproject.toml"), "service", "onnx"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert "torch==2.14.1" in out and any(r.startswith("fastapi==") for r in out)
    assert any(r.startswith("onnxruntime==") for r in out)
    assert all(re.search(r"==", r) for r in out)  # every requirement pinned
    bad = subprocess.run(["python3", str(script), str(ROOT / "pyproject.toml"), "nope"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown extras" in bad.stderr


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (v1) is not installed")
def test_docker_compose_v1_reads_both_files_and_the_cpu_profile():
    cmd = ["docker-compose", "-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml", "--profile", "cpu"]
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "KEGNET_ENV_FILE": ".env.example"}
    merged = yaml.safe_load(subprocess.run([*cmd, "config"], cwd=ROOT, capture_output=True, text=True,
                                           env=env, check=True).stdout)["services"]
    # v1 merges the override's profile in and keeps the reservation (it cannot delete it: hence the profile)
    assert merged["worker"]["profiles"] == ["gpu"] and "devices" in str(merged["worker"]["deploy"])
    assert merged["worker-cpu"]["profiles"] == ["cpu"] and "deploy" not in merged["worker-cpu"]
    assert merged["redis"]["image"] == "redis:7.4-alpine"
