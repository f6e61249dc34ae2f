"""The hardening issue's probes against the real API process (uvicorn), with its peak memory measured.

Each probe once grew the API by hundreds of MB or let a job through that should not exist: a deflated
checkpoint bomb, a spec describing a 16,384-wide MLP, a job whose generator batches alone need tens of
GiB, and 30 concurrent submissions racing a per-key cap.
"""

from __future__ import annotations

import json
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from tests.service.svc_helpers import MLP_MODEL, TINY_CONFIG, auth, mlp_state, write_mlp_safetensors

pytestmark = pytest.mark.integration


def _vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def _post(url: str, key: str, path: Path, model: dict, config: dict | None = None) -> httpx.Response:
    spec = json.dumps({"model": model, "config": config or TINY_CONFIG, "device": "cpu"})
    with path.open("rb") as f:
        return httpx.post(f"{url}/v1/jobs", files={"checkpoint": ("x", f)}, data={"spec": spec}, headers=auth(key),
                          timeout=60)


def test_probes_are_refused_and_the_api_stays_small(stack, api_key, tmp_path: Path) -> None:
    pid = stack.api.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak resident set to what is in use now
    baseline = _vm_kib(pid, "VmRSS")

    # 1. A deflated checkpoint bomb: 256 MiB of zeros in a file of a few hundred KB.
    plain, bomb = tmp_path / "plain.pt", tmp_path / "bomb.pt"
    torch.save({**mlp_state(), "padding": torch.zeros(64 << 20)}, plain)
    with zipfile.ZipFile(plain) as zin, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            with zin.open(info) as src, zout.open(info.filename, "w", force_zip64=True) as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
    plain.unlink()
    assert bomb.stat().st_size < 2 << 20
    r = _post(stack.url, api_key, bomb, MLP_MODEL)
    assert r.status_code == 422 and "compressed entries" in r.json()["detail"], r.text

    # 2. A 1 KB upload whose spec describes a model of half a billion parameters.
    small = write_mlp_safetensors(tmp_path / "small.safetensors")
    r = _post(stack.url, api_key, small, {**MLP_MODEL, "arch_kwargs": {"hidden": [16_384, 16_384]}})
    assert r.status_code == 422 and "parameters, above this service's limit" in r.json()["detail"], r.text

    # 3. Every field in bounds, their product not: 16 generators x batch 2,048 x 16x512x512 inputs.
    image = {"arch": "resnet", "arch_kwargs": {"depth": 8, "widths": [2]}, "input_shape": [16, 512, 512],
             "num_classes": 2}
    torch.manual_seed(0)
    from safetensors.torch import save_file

    from kegnet import create_model

    tiny = create_model("resnet", input_shape=(16, 512, 512), num_classes=2, depth=8, widths=[2])
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(tmp_path / "tiny.safetensors"))
    huge = {**TINY_CONFIG, "generator": {"num_generators": 16, "batch_size": 2048, "steps": 200_000}}
    r = _post(stack.url, api_key, tmp_path / "tiny.safetensors", image, huge)
    assert r.status_code == 422 and "batch_size" in r.json()["detail"], r.text

    # 4. 30 concurrent submissions against the stack's per-key cap of 10 (jobs long enough to stay active).
    import redis

    from service.keys import KeyStore

    racer = KeyStore(redis.Redis.from_url(stack.redis_url, decode_responses=True)).create("racer")[1]
    long = {**TINY_CONFIG, "generator": {"num_generators": 1, "steps": 200_000, "batch_size": 32}}
    with ThreadPoolExecutor(30) as pool:
        codes = list(pool.map(lambda _: _post(stack.url, racer, small, MLP_MODEL, long).status_code, range(30)))
    assert codes.count(202) == 10 and codes.count(429) == 20, codes
    jobs = httpx.get(f"{stack.url}/v1/jobs", params={"limit": 50}, headers=auth(racer), timeout=30).json()["jobs"]
    for job in jobs:
        httpx.post(f"{stack.url}/v1/jobs/{job['id']}/cancel", headers=auth(racer), timeout=30)

    peak = _vm_kib(pid, "VmHWM")
    assert peak - baseline < 200 * 1024, f"the API grew from {baseline} KiB to a peak of {peak} KiB"
