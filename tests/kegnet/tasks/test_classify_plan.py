"""The classifier's plan stage when the latency filter leaves nothing: what a user who set nothing gets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kegnet import CompressionError, run_pipeline
from kegnet.compression import latency
from tests.conftest import tiny_config


def _every_factorization_slower(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(first: nn.Module, second: nn.Module, input_shape: tuple[int, ...], batch: int, device: torch.device,
             **_: object) -> dict[str, float]:
        return {"first_ms": 1.0, "first_min_ms": 1.0, "second_ms": 5.0, "second_min_ms": 5.0, "spread": 0.0}

    monkeypatch.setattr(latency, "compare_ms", fake)


def test_unset_keep_slower_keeps_a_smaller_student_when_every_layer_ran_slower(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_cnn, small_cnn_spec) -> None:
    _every_factorization_slower(monkeypatch)
    unset = tiny_config(compression={"rank_method": "fraction"})
    unset = unset.model_copy(update={"compression": unset.compression.model_copy(update={"keep_slower": None}),
                                     "export_portable": False, "export_onnx": False})
    result = run_pipeline(small_cnn, small_cnn_spec, unset, tmp_path / "unset", device="cpu", seed=0)
    report = result.report
    assert report.classify.plan["layers"] and report.compression_ratio > 1.0
    assert any(w.startswith("every factorization ran slower") and "smaller, not faster" in w
               for w in report.warnings)
    # Asked for speed (keep_slower false): the job fails and says what to change.
    strict = unset.model_copy(update={"compression": unset.compression.model_copy(update={"keep_slower": False})})
    with pytest.raises(CompressionError, match="every factorization ran slower.*keep_slower"):
        run_pipeline(small_cnn, small_cnn_spec, strict, tmp_path / "strict", device="cpu", seed=0)
