"""``KegnetClient.submit`` builds the multipart body the API reads (no server: a mock transport records it)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from kegnet.client import KegnetClient


def _record(sent: list[httpx.Request]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        sent.append(request)
        return httpx.Response(202, json={"id": "0" * 32, "status": "queued"})

    return httpx.MockTransport(handler)


def test_submit_sends_the_eval_set_as_its_own_file_field(tmp_path: Path) -> None:
    ckpt, evals = tmp_path / "t.safetensors", tmp_path / "e.safetensors"
    ckpt.write_bytes(b"CHECKPOINT-BYTES")
    evals.write_bytes(b"EVAL-SET-BYTES")
    sent: list[httpx.Request] = []
    with KegnetClient("http://api", "k", transport=_record(sent)) as client:
        client.submit(ckpt, {"arch": "mlp"}, eval_set=evals)
        client.submit(ckpt, {"arch": "mlp"})
    with_eval, without = (r.content for r in sent)
    assert sent[0].url.path == "/v1/jobs" and sent[0].headers["authorization"] == "Bearer k"
    assert with_eval.count(b'; name="checkpoint"') == 1 and with_eval.count(b'; name="eval_set"') == 1
    part = with_eval.split(b'; name="eval_set"', 1)[1]
    assert b"EVAL-SET-BYTES" in part and b"CHECKPOINT-BYTES" not in part
    assert json.dumps({"model": {"arch": "mlp"}, "seed": 0, "device": "auto"}).encode() in with_eval
    assert b'name="eval_set"' not in without and b"CHECKPOINT-BYTES" in without


def test_submit_command_passes_eval_set(tmp_path: Path, monkeypatch) -> None:
    import typer
    from typer.testing import CliRunner

    from kegnet.client import register_client_commands

    ckpt, evals = tmp_path / "t.safetensors", tmp_path / "e.safetensors"
    ckpt.write_bytes(b"c")
    evals.write_bytes(b"e")
    seen: dict = {}

    def submit(self, checkpoint, model, config=None, **kwargs):
        seen.update(kwargs, model=model)
        return {"id": "0" * 32, "status": "queued"}

    monkeypatch.setattr(KegnetClient, "submit", submit)
    app = typer.Typer()
    register_client_commands(app)
    result = CliRunner().invoke(app, ["submit", str(ckpt), "--arch", "mlp", "--input-shape", "8",
                                      "--num-classes", "3", "--eval-set", str(evals)])
    assert result.exit_code == 0, result.output
    assert seen["eval_set"] == evals and seen["model"]["input_shape"] == [8]


def test_submit_quantize_sets_compression_quantize_over_the_config_file(tmp_path: Path, monkeypatch) -> None:
    import typer
    from typer.testing import CliRunner

    from kegnet.client import register_client_commands

    ckpt, config = tmp_path / "t.safetensors", tmp_path / "c.json"
    ckpt.write_bytes(b"c")
    config.write_text(json.dumps({"distill": {"steps": 5}, "compression": {"layers": ["fc1"]}}))
    seen: dict = {}

    def submit(self, checkpoint, model, config=None, **kwargs):
        seen["config"] = config
        return {"id": "0" * 32, "status": "queued"}

    monkeypatch.setattr(KegnetClient, "submit", submit)
    app = typer.Typer()
    register_client_commands(app)
    result = CliRunner().invoke(app, ["submit", str(ckpt), "--arch", "mlp", "--input-shape", "8",
                                      "--num-classes", "3", "--config-file", str(config), "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    assert seen["config"] == {"distill": {"steps": 5}, "compression": {"layers": ["fc1"], "quantize": "int8"}}
