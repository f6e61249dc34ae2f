"""The manifest's confidence section: estimate, level, and warnings a user can act on."""

from kegnet.distill.confidence import assess
from kegnet.distill.exam import Grade

SOURCES = {"gaussian": 50, "uniform": 50}


def _grade(agreement: float, per_class: dict[int, tuple[float, int]] | None = None) -> Grade:
    return Grade(agreement, 0.1, per_class or {0: (agreement, 50), 1: (agreement, 50)})


def test_a_good_student_has_a_high_level_and_no_warning() -> None:
    c = assess({"kegnet/pairs": _grade(0.97)}, "kegnet/pairs", _grade(0.7), 2, SOURCES)
    assert c["estimate"] == 0.97 and c["level"] == "high" and c["warnings"] == []
    assert c["chosen"] == "kegnet/pairs" and c["candidates"]["kegnet/pairs"]["chosen"]
    assert c["exam"]["samples"] == 100 and c["before_finetune"]["agreement"] == 0.7


def test_low_estimates_regressions_laggards_weak_and_unseen_classes_are_flagged() -> None:
    weak = {0: (0.95, 50), 1: (0.3, 40)}  # class 2 of 3 never predicted on the exam
    c = assess({"kegnet/simplex": Grade(0.6, 0.5, weak), "gaussian": _grade(0.75)}, "kegnet/simplex",
               _grade(0.74), 3, SOURCES)
    text = " | ".join(c["warnings"])
    assert c["level"] == "low" and "low estimate" in text
    assert "fine-tuning lowered the exam agreement" in text
    assert "gaussian" not in text.split("recipes far below")[1] and "kegnet/simplex 60.0%" in text
    assert "classes the student often gets wrong on the exam: 1 (30%)" in text
    assert "no exam sample as class 2" in text
    assert c["candidates"]["kegnet/simplex"]["far_below_best"] and not c["candidates"]["gaussian"]["far_below_best"]


def test_without_fine_tuning_the_decomposed_student_is_what_is_assessed() -> None:
    c = assess({}, None, _grade(0.85), 2, SOURCES)
    assert c["estimate"] == 0.85 and c["level"] == "medium" and c["chosen"] is None and c["candidates"] == {}
