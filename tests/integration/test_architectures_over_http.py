"""A timm architecture and an ONNX graph compressed over HTTP by the real API and a real Celery worker."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kegnet import create_model
from kegnet.client import KegnetClient
from tests.service.svc_helpers import TINY_CONFIG

pytestmark = pytest.mark.integration

SMALL = {**TINY_CONFIG, "compression": {**TINY_CONFIG["compression"], "n_iter_max": 1}}


@pytest.fixture
def client(stack, api_key):
    with KegnetClient(stack.url, api_key) as c:
        yield c


def test_timm_mobilenet_job_reports_latency(client, stack, tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = {"arch": "timm:mobilenetv3_small_050", "input_shape": [1, 32, 32], "num_classes": 10}
    model = create_model(spec["arch"], input_shape=(1, 32, 32), num_classes=10)
    path = tmp_path / "mobilenet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    job = client.submit(path, spec, {**SMALL, "export_portable": False})
    job = client.wait(job["id"], timeout=180, poll=0.5, progress=False)
    assert job["status"] == "succeeded", (job, stack.logs())
    assert job["metrics"]["architecture_source"] == "timm"
    assert job["metrics"]["student_latency_ms"]["batch1_ms"] > 0
    client.download(job["id"], tmp_path / "out", ["manifest.json"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["architecture"] == {"source": "timm", "name": "mobilenetv3_small_050", "kwargs": {},
                                        "library_version": manifest["architecture"]["library_version"]}
    assert any("depthwise" in why for why in manifest["classify"]["plan"]["skipped"].values())
    assert manifest["parameters"]["student"] < manifest["parameters"]["teacher"]


def test_onnx_upload_without_shapes(client, stack, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(32, 5)).eval()
    path = tmp_path / "mine.onnx"
    torch.onnx.export(net, (torch.zeros(2, 3, 16, 16),), str(path), dynamo=True, external_data=False,
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    job = client.submit(path, {"arch": "onnx"}, SMALL)
    job = client.wait(job["id"], timeout=180, poll=0.5, progress=False)
    assert job["status"] == "succeeded", (job, stack.logs())
    client.download(job["id"], tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["spec"]["input_shape"] == [3, 16, 16] and manifest["spec"]["num_classes"] == 5
    assert manifest["architecture"]["source"] == "onnx" and manifest["architecture"]["opset"] >= 18
    session = ort.InferenceSession(str(tmp_path / "out" / "student.onnx"))
    out = session.run(None, {session.get_inputs()[0].name: np.zeros((4, 3, 16, 16), np.float32)})[0]
    assert out.shape == (4, 5)


def test_demo_keeps_its_results_and_says_how_to_use_the_student(stack, api_key, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "demo-out"
    proc = subprocess.run([sys.executable, "-m", "kegnet.demo", "--url", stack.url, "--api-key", api_key,
                           "--out", str(out)], capture_output=True, text=True, timeout=300, env=stack.env)
    assert proc.returncode == 0, proc.stderr[-2000:] + stack.logs()
    assert (out / "results" / "student.pt2").is_file() and (out / "results" / "manifest.json").is_file()
    assert f'torch.export.load("{out / "results" / "student.pt2"}")' in proc.stdout
    assert "latency batch 1" in proc.stdout
