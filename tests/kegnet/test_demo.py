"""kegnet.demo against a stand-in service: the pipeline runs here, and the demo's table reads the run report."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kegnet import ModelSpec, demo, run_pipeline
from tests.conftest import tiny_config


class _LocalService:
    """What the demo asks of ``KegnetClient``, with the job run in this process on a tiny budget."""

    def __init__(self, url: str | None, api_key: str | None) -> None:
        self.url = url
        self.http = SimpleNamespace(get=lambda path: SimpleNamespace(status_code=200))
        self.job: dict[str, Any] = {}

    def __enter__(self) -> _LocalService:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def submit(self, checkpoint: Path, model: dict, config: dict, **kwargs: Any) -> dict[str, Any]:
        self.job = {"id": "j1", "checkpoint": checkpoint, "spec": ModelSpec(**model), "seed": kwargs["seed"]}
        return self.job

    def wait(self, job_id: str, poll: float) -> dict[str, Any]:
        return {**self.job, "status": "succeeded"}

    def download(self, job_id: str, out: Path) -> None:
        run_pipeline(self.job["checkpoint"], self.job["spec"], tiny_config("tucker-only"), out, device="cpu",
                     seed=self.job["seed"])


def test_the_demo_prints_the_reports_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    monkeypatch.setattr(demo, "KegnetClient", _LocalService)
    train = demo.train_teacher
    monkeypatch.setattr(demo, "train_teacher", lambda x, y, seed: train(x, y, seed, epochs=2))
    assert demo.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    report = demo.RunReport.read(tmp_path / "results")
    p = report.parameters
    assert f"{p.teacher:,}" in out and f"{p.student:,}" in out and f"{report.compression_ratio:.2f}x" in out
    assert f"latency batch 1, ms ({report.speed.device})" in out
    assert f"{report.speed.student['batch64_ms']:.3f}" in out
    assert "test accuracy (540 digits)" in out and "student.pt2" in out
