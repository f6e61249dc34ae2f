"""The classifier's decompose stage with ``compression.fit``: which start fine-tuning begins from."""

from __future__ import annotations

from pathlib import Path

import pytest

from kegnet import run_pipeline
from tests.conftest import tiny_config


@pytest.mark.parametrize("fit", ["auto", "outputs", "weights"])
def test_the_start_is_the_fit_the_exam_prefers(tmp_path: Path, small_cnn, small_cnn_spec, fit: str) -> None:
    cfg = tiny_config(compression={"rank_method": "fraction", "fit": fit, "fit_samples": 64},
                      distill={"steps": 0}).model_copy(update={"export_portable": False, "export_onnx": False})
    report = run_pipeline(small_cnn, small_cnn_spec, cfg, tmp_path, device="cpu", seed=0).report
    recorded = report.classify.fit
    if fit == "weights":
        assert recorded is None
        return
    assert recorded["method"] == fit and set(recorded["layers"]) == {p["name"] for p in report.classify.plan["layers"]}
    if fit == "auto":
        scores = recorded["exam"]
        assert set(scores) == {"weights", "outputs"}
        assert recorded["chosen"] == ("outputs" if scores["outputs"] >= scores["weights"] else "weights")  # ties: refit
        # Nothing fine-tuned: the student is the chosen start, graded on the same exam.
        assert report.classify.confidence.estimate == pytest.approx(scores[recorded["chosen"]])
    else:
        assert "chosen" not in recorded
