"""Uploads that would expand while they are checked, and programs instead of weights, get a clear 422."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from tests.service.svc_helpers import auth, mlp_state, spec_json


def _post(client, key: str, path: Path):
    return client.post("/v1/jobs", files={"checkpoint": ("upload.bin", path.read_bytes())},
                       data={"spec": spec_json()}, headers=auth(key))


def test_deflated_archive_bomb_is_refused_unread(client, keys, tmp_path, enqueued, monkeypatch):
    """The issue's bomb, scaled down: a valid MLP state dict plus 32 MiB of zeros, deflated to a few KB."""
    plain = tmp_path / "plain.pt"
    torch.save({**mlp_state(), "padding": torch.zeros(8 << 20)}, plain)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as zin, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    plain.unlink()
    assert bomb.stat().st_size < 64 * 1024

    import kegnet.checkpoint as ckpt

    def never(*args, **kwargs):
        raise AssertionError("torch.load read the bomb")

    monkeypatch.setattr(ckpt.torch, "load", never)
    r = _post(client, keys["alice"], bomb)
    assert r.status_code == 422, r.text
    assert "compressed entries" in r.json()["detail"] and "torch.save" in r.json()["detail"]
    assert enqueued == []


def test_programs_are_refused_saying_what_they_are(client, keys, tmp_path, enqueued):
    model = torch.nn.Sequential(torch.nn.Linear(8, 3))
    torch.jit.save(torch.jit.script(model), tmp_path / "ts.pt")
    torch.export.save(torch.export.export(model, (torch.zeros(2, 8),)), tmp_path / "m.pt2")
    for name, what in [("ts.pt", "TorchScript archive"), ("m.pt2", "torch.export program")]:
        r = _post(client, keys["alice"], tmp_path / name)
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert what in detail and "carry code" in detail and "state_dict" in detail and "onnx" in detail
        assert "weights_only" not in detail and "truncated" not in detail
    assert enqueued == []
