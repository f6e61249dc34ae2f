"""The classifier's decompose stage with ``compression.fit``: which start fine-tuning begins from."""

from __future__ import annotations

from pathlib import Path

import pytest

from kegnet import run_pipeline
from kegnet.tasks import classify
from tests.conftest import tiny_config


def _report(tmp_path: Path, small_cnn, small_cnn_spec, fit: str):
    cfg = tiny_config(compression={"rank_method": "fraction", "fit": fit, "fit_samples": 64},
                      distill={"steps": 0}).model_copy(update={"export_portable": False, "export_onnx": False})
    return run_pipeline(small_cnn, small_cnn_spec, cfg, tmp_path, device="cpu", seed=0).report


@pytest.mark.parametrize("fit", ["outputs", "weights"])
def test_a_fit_that_is_asked_for_is_the_start(tmp_path: Path, small_cnn, small_cnn_spec, fit: str) -> None:
    report = _report(tmp_path, small_cnn, small_cnn_spec, fit)
    if fit == "weights":
        assert report.classify.fit is None
        return
    assert report.classify.fit["method"] == "outputs" and "chosen" not in report.classify.fit
    assert set(report.classify.fit["layers"]) == {p["name"] for p in report.classify.plan["layers"]}


@pytest.mark.parametrize("refit_below", [0.0, 1.01])
def test_auto_refits_only_a_weight_fit_the_exam_scores_low(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           small_cnn, small_cnn_spec, refit_below: float) -> None:
    monkeypatch.setattr(classify, "REFIT_BELOW", refit_below)
    report = _report(tmp_path, small_cnn, small_cnn_spec, "auto")
    fit, scores = report.classify.fit, report.classify.fit["exam"]
    assert fit["method"] == "auto"
    if refit_below == 0.0:  # every weight fit scores at least 0: kept, and no sample is fitted
        assert fit["chosen"] == "weights" and set(scores) == {"weights"} and "layers" not in fit
    else:
        assert set(scores) == {"weights", "outputs"} and "layers" in fit
        assert fit["chosen"] == ("outputs" if scores["outputs"] >= scores["weights"] else "weights")  # ties: refit
    # Nothing fine-tuned: the student is the chosen start, graded on the same exam.
    assert report.classify.confidence.estimate == pytest.approx(scores[fit["chosen"]])


@pytest.mark.parametrize("feature_weight", [None, 0.0, 2.0])
def test_hints_follow_the_refit_unless_set(tmp_path: Path, small_cnn, small_cnn_spec,
                                           feature_weight: float | None) -> None:
    cfg = tiny_config(compression={"rank_method": "fraction", "fit": "outputs", "fit_samples": 64},
                      distill={"steps": 2, "eval_every": 1, "feature_weight": feature_weight})
    cfg = cfg.model_copy(update={"export_portable": False, "export_onnx": False})
    report = run_pipeline(small_cnn, small_cnn_spec, cfg, tmp_path, device="cpu", seed=0).report
    assert report.classify.fit["feature_weight"] == (classify.HINTS_AFTER_REFIT if feature_weight is None
                                                     else feature_weight)
