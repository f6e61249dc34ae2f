"""The whole service with real processes: submit → run → download; cancel; worker death; API restart."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import redis
import torch

from kegnet.client import ClientError, KegnetClient
from tests.conftest import MNIST_TEACHER, needs_shared
from tests.service.svc_helpers import MLP_MODEL, REDIS_TEST_URL, TINY_CONFIG, write_mlp_safetensors

pytestmark = pytest.mark.integration

LONG_CONFIG = {**TINY_CONFIG, "generator": {"num_generators": 1, "steps": 200_000, "batch_size": 32}}


@pytest.fixture
def client(stack, api_key):
    with KegnetClient(stack.url, api_key) as c:
        yield c


@pytest.fixture
def teacher(tmp_path: Path) -> Path:
    return write_mlp_safetensors(tmp_path / "teacher.safetensors")


def wait_for(predicate, timeout: float, what: str, stack=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{stack.logs()}" if stack else ""))


def test_tiny_job_succeeds_and_student_loads(client, stack, teacher, tmp_path):
    job = client.submit(teacher, MLP_MODEL, TINY_CONFIG, device="auto")
    job = client.wait(job["id"], timeout=90, poll=0.3, progress=False)
    assert job["status"] == "succeeded", (job, stack.logs())
    assert job["metrics"]["compression_ratio"] > 1
    paths = client.download(job["id"], tmp_path / "out")
    assert {p.name for p in paths} >= {"student.pt2", "student.safetensors", "manifest.json"}
    program = torch.export.load(tmp_path / "out" / "student.pt2")
    assert program.module()(torch.randn(5, 8)).shape == (5, 3)
    events = client.events(job["id"])["events"]
    stages = {e.get("stage") for e in events if e["type"] == "progress"}
    assert {"generators", "finetune", "export"} <= stages


def test_teacher_ensemble_job_over_http(client, stack, tmp_path):
    teachers = [write_mlp_safetensors(tmp_path / f"t{i}.safetensors", seed=i) for i in range(2)]
    config = {**TINY_CONFIG, "distill": {**TINY_CONFIG["distill"], "ensemble_weighting": "entropy"}}
    job = client.submit(teachers, MLP_MODEL, config)
    assert len(job["checkpoints"]) == 2
    job = client.wait(job["id"], timeout=90, poll=0.3, progress=False)
    assert job["status"] == "succeeded", (job, stack.logs())
    assert job["metrics"]["teachers"] == 2
    client.download(job["id"], tmp_path / "out", ["manifest.json"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["classify"]["teachers"]["count"] == 2 and manifest["classify"]["teachers"]["weighting"] == "entropy"


SEQ_KWARGS = {"n_layers": 1, "d_model": 32, "n_heads": 2}
SEQ_MODEL = {"arch": "transformer", "arch_kwargs": SEQ_KWARGS, "task": "sequence",
             "sequence": {"vocab_size": 16, "max_length": 10, "bos_id": 1, "eos_id": 2, "pad_id": 0, "sep_id": 3}}
SEQ_CONFIG = {"compression": {"rank_method": "ratio", "target_ratio": 1.5},
              "sequence": {"samples": 128, "holdout": 16, "steps": 20, "eval_every": 10, "batch_size": 16}}


def test_sequence_job_over_http(client, stack, tmp_path):
    from safetensors.torch import save_file

    from kegnet.models import create_model

    torch.manual_seed(0)
    path = tmp_path / "lm.safetensors"
    save_file(create_model("transformer", vocab_size=16, max_length=10, **SEQ_KWARGS).state_dict(), str(path))
    job = client.submit(path, SEQ_MODEL, SEQ_CONFIG, device="auto")
    job = client.wait(job["id"], timeout=120, poll=0.3, progress=False)
    assert job["status"] == "succeeded", (job, stack.logs())
    assert job["metrics"]["compression_ratio"] > 1.4 and 0 <= job["metrics"]["synthetic_agreement"] <= 1
    stages = {e.get("stage") for e in client.events(job["id"])["events"] if e["type"] == "progress"}
    assert {"compress", "sample", "finetune", "export"} <= stages
    client.download(job["id"], tmp_path / "out")
    logits = torch.export.load(tmp_path / "out" / "student.pt2").module()(torch.ones(2, 5, dtype=torch.long))
    assert logits.shape == (2, 5, 16)
    # What a sequence job cannot take is a 422 that says why, before any job exists.
    with pytest.raises(ClientError, match="shape mismatch"):
        client.submit(path, {**SEQ_MODEL, "sequence": {**SEQ_MODEL["sequence"], "vocab_size": 20}}, SEQ_CONFIG)
    with pytest.raises(ClientError, match="one 'checkpoint' file"):
        client.submit([path, path], SEQ_MODEL, SEQ_CONFIG)


@needs_shared(MNIST_TEACHER)
def test_shared_mnist_teacher_over_http(client, stack, tmp_path):
    model = {"arch": "lenet5", "input_shape": [1, 32, 32], "num_classes": 10}
    config = {**TINY_CONFIG, "compression": {"rank_method": "evbmf", "keep_slower": True}}
    job = client.submit(MNIST_TEACHER, model, config)
    job = client.wait(job["id"], timeout=120, poll=0.3, progress=False)
    assert job["status"] == "succeeded", (job, stack.logs())
    client.download(job["id"], tmp_path / "mnist", ["student.pt2"])
    program = torch.export.load(tmp_path / "mnist" / "student.pt2")
    assert program.module()(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_cancel_running_job(client, stack, teacher):
    job = client.submit(teacher, MLP_MODEL, LONG_CONFIG)
    wait_for(lambda: client.status(job["id"])["progress"] > 0.0, 60, "job to make progress", stack)
    assert client.cancel(job["id"])["status"] == "cancelling"
    done = wait_for(lambda: (j := client.status(job["id"]))["status"] in ("cancelled", "failed") and j, 30,
                    "cancellation", stack)
    assert done["status"] == "cancelled"
    with pytest.raises(ClientError) as err:
        client.cancel(job["id"])
    assert err.value.status == 409


def test_worker_killed_mid_job_is_reaped_then_worker_recovers(client, stack, teacher, tmp_path):
    job = client.submit(teacher, MLP_MODEL, LONG_CONFIG)
    wait_for(lambda: client.status(job["id"])["status"] == "running", 60, "job to start", stack)
    r = redis.Redis.from_url(REDIS_TEST_URL, decode_responses=True)
    where = r.hget(f"kegnet:job:{job['id']}", "worker")
    host, pid = where.rsplit(":", 1)
    assert host == socket.gethostname()
    os.kill(int(pid), signal.SIGKILL)  # what the OOM killer does to a child
    # The prefork parent sees its child die and records it at once (the reaper is the backstop).
    failed = wait_for(lambda: (j := client.status(job["id"]))["status"] != "running" and j, 30, "failure", stack)
    # Usually the parent's message ("...the process running the job died..."); on a loaded host the
    # reaper may win the race. Either way the job ends as failed, never running forever.
    assert failed["status"] == "failed" and failed["error"].startswith("worker lost")
    # The prefork parent replaced its child: the next job still runs.
    nxt = client.wait(client.submit(teacher, MLP_MODEL, TINY_CONFIG)["id"], timeout=90, poll=0.3, progress=False)
    assert nxt["status"] == "succeeded", stack.logs()


def test_whole_worker_killed_job_is_reaped(client, stack, teacher):
    """SIGKILL to the whole worker (parent too, e.g. the host died): only the reaper can end the job."""
    job = client.submit(teacher, MLP_MODEL, LONG_CONFIG)
    wait_for(lambda: client.status(job["id"])["status"] == "running", 60, "job to start", stack)
    stack.stop(stack.worker, signal.SIGKILL)
    failed = wait_for(lambda: (j := client.status(job["id"]))["status"] != "running" and j, 30, "reaper", stack)
    assert failed["status"] == "failed" and failed["error"] == "worker lost; resubmit the job"
    stack.start_worker()
    nxt = client.wait(client.submit(teacher, MLP_MODEL, TINY_CONFIG)["id"], timeout=90, poll=0.3, progress=False)
    assert nxt["status"] == "succeeded", stack.logs()


def test_api_restart_keeps_jobs(client, stack, teacher, tmp_path):
    job = client.wait(client.submit(teacher, MLP_MODEL, TINY_CONFIG)["id"], timeout=90, poll=0.3, progress=False)
    assert job["status"] == "succeeded"
    stack.stop_api()
    stack.start_api()
    again = client.status(job["id"])
    assert again["status"] == "succeeded" and again["artifacts"] == job["artifacts"]
    assert client.download(job["id"], tmp_path / "after", ["manifest.json"])
    assert job["id"] in [j["id"] for j in client.list(limit=100)["jobs"]]


def test_declared_oversize_refused_before_body(stack, api_key):
    # Claim a 10 GB body and send none of it: the real server must answer 413 at once.
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as s:
        s.sendall((f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api_key}\r\n"
                   "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 10000000000\r\n\r\n").encode())
        head = s.recv(200).decode(errors="replace")
    assert head.startswith("HTTP/1.1 413")


def test_cli_commands_against_the_service(stack, api_key, teacher, tmp_path):
    import json

    import typer
    from typer.testing import CliRunner

    from kegnet.client import register_client_commands

    app = typer.Typer()
    register_client_commands(app)
    env = {"KEGNET_URL": stack.url, "KEGNET_API_KEY": api_key}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": MLP_MODEL, "config": TINY_CONFIG, "device": "cpu"}))
    runner = CliRunner()
    r = runner.invoke(app, ["submit", str(teacher), "--spec-file", str(spec)], env=env)
    assert r.exit_code == 0, r.output
    job_id = json.loads(r.stdout)["id"]
    r = runner.invoke(app, ["wait", job_id, "--timeout", "90"], env=env)
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "succeeded", r.output
    r = runner.invoke(app, ["download", job_id, "--out", str(tmp_path / "cli"), "--name", "student.pt2"], env=env)
    assert r.exit_code == 0 and (tmp_path / "cli" / "student.pt2").is_file(), r.output
    r = runner.invoke(app, ["status", job_id], env={**env, "KEGNET_API_KEY": "kgn_wrong"})
    assert r.exit_code == 2 and "401" in r.output
