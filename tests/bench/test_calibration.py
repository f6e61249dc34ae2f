"""``python -m bench calibration``: recorded students against the confidence rule."""

import json
from pathlib import Path

import pytest

from bench.calibration import LARGE, LIMIT, RESULTS, Point, fit, fit_above, leave_one_out, load, main
from kegnet.distill.confidence import HIGH, LOW


def test_on_every_recorded_student_high_is_within_two_points_and_large_losses_are_low() -> None:
    points, older = load(sorted(RESULTS.glob("*.json")))
    assert len({p.teacher for p in points}) >= 14 and len(points) >= 200 and older
    assert all(p.loss <= LIMIT for p in points if p.level == "high")
    assert all(p.level == "low" for p in points if p.loss > LARGE)
    assert sum(p.level == "high" for p in points) >= 100  # the level is not merely never given
    assert fit(points) == (HIGH, LOW)  # the product's thresholds are the fit of these records


def test_fitted_thresholds_sit_a_margin_above_the_worst_student() -> None:
    assert fit_above([0.886]) == 0.91 and fit_above([0.899]) == 0.92 and fit_above([0.88]) == 0.9
    assert fit_above([]) == 0.0


def _point(teacher: str, estimate: float, loss: float) -> Point:
    return Point(teacher, f"{teacher} {estimate}", 0.9, 0.9 - loss / 100, estimate)


def test_leave_one_teacher_out_applies_thresholds_fitted_without_the_teacher() -> None:
    # Alone, b's worst student would put "high" at 0.82: a's student at 0.90 that lost 3 points would pass.
    points = [_point("a", 0.90, 3.0), _point("a", 0.97, 0.5), _point("b", 0.80, 4.0), _point("b", 0.95, 1.0)]
    assert fit(points) == (0.92, 0.0)
    wrong, right, worst = leave_one_out(points, lambda p: p.estimate)
    assert (wrong, right) == (1, 2) and worst == pytest.approx(3.0)


def _suite(entry: str, accuracy: float, agreement: float, balanced: float) -> dict:
    candidate = {"accuracy": accuracy, "agreement": agreement, "balanced": balanced, "kl": 0.1,
                 "per_source": {"kegnet/one_hot": agreement, "gaussian": agreement}, "chosen": True}
    return {"entries": [{"entry": entry, "teacher": {"test_accuracy": 0.95},
                         "tucker_only": {"accuracy": 0.5, "exam": 0.99},
                         "runs": [{"seed": 0, "candidates": {"kegnet/simplex": candidate}}]}]}


def _scenario(name: str, agreement: float, confidence: dict | None) -> dict:
    row = {"setting": "2.5x", "method": "kegnet", "accuracy": [0.80], "agreement": [agreement]}
    if confidence is not None:
        row["confidence"] = [confidence]
    return {"scenario": name, "rows": [{"setting": "-", "method": "teacher", "accuracy": [0.81]}, row]}


def test_files_are_read_once_and_older_agreements_kept_apart(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    files = {"suite.json": _suite("t", 0.90, 0.97, 0.80), "suite-part.json": _suite("t", 0.90, 0.97, 0.80),
             "lib.json": _scenario("lib", 0.96, {"balanced": 0.95, "kl": 0.1, "per_source": {"gaussian": 0.96},
                                                 "exam": {"sources": {"gaussian": 64, "uniform": 64}}}),
             "old.json": _scenario("old", 1.0, None)}
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    points, older = load(sorted(tmp_path.glob("*.json")))
    by_run = {p.run: p for p in points}
    assert len(points) == 3 and len(older) == 1  # the suite student and its tucker-only twin counted once
    student = by_run["seed 0 kegnet/simplex"]
    assert student.estimate == 0.80 and student.loss == pytest.approx(5.0) and student.level == "low"
    assert by_run["tucker-only"].level == "medium"  # 0.99 on a noise-only exam: never high
    lib = by_run["lib.json 2.5x kegnet seed 0"]
    assert lib.estimate == 0.95 and not lib.generator_exam and lib.level == "medium"
    assert older[0].agreement == 1.0
    main(["--files", *map(str, sorted(tmp_path.glob("*.json"))), "--all"])
    out = capsys.readouterr().out
    assert "3 students with an exam grade" in out and "| t | seed 0 kegnet/simplex | 0.970 | 0.800 | 0.800 | low" in out
    assert "Older scenario rows" in out
