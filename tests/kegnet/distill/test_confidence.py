"""The manifest's confidence section: estimate, level, and warnings a user can act on."""

from kegnet.distill.confidence import HIGH, LOW, assess, estimate_of, is_calibrated, level
from kegnet.distill.exam import Grade

SOURCES = {"kegnet/one_hot": 50, "gaussian": 25, "uniform": 25}
NOISE_ONLY = {"gaussian": 50, "uniform": 50}


def _grade(agreement: float, per_class: dict[int, tuple[float, int]] | None = None) -> Grade:
    return Grade(agreement, 0.1, per_class or {0: (agreement, 50), 1: (agreement, 50)})


def test_a_good_student_has_a_high_level_and_no_warning() -> None:
    c = assess({"kegnet/pairs": _grade(0.97)}, "kegnet/pairs", _grade(0.7), 2, SOURCES)
    assert c["estimate"] == 0.97 and c["level"] == "high" and c["warnings"] == []
    assert c["chosen"] == "kegnet/pairs" and c["candidates"]["kegnet/pairs"]["chosen"]
    assert c["exam"]["samples"] == 100 and c["before_finetune"]["agreement"] == 0.7
    assert c["agreement"] == 0.97 and c["generator_exam"]
    assert c["thresholds"] == {"low": LOW, "high": HIGH, "far_below": 0.05}


def test_the_estimate_is_the_lower_of_plain_and_balanced_agreement() -> None:
    # 97% overall, but the student is right on a third of the teacher's rarer class only.
    lopsided = Grade(0.97, 0.1, {0: (1.0, 90), 1: (0.7, 10)})
    c = assess({"kegnet/simplex": lopsided}, "kegnet/simplex", _grade(0.7), 2, SOURCES)
    assert c["estimate"] == estimate_of(0.97, 0.85) == 0.85 and c["balanced"] == 0.85
    assert c["agreement"] == 0.97 and c["level"] == "low" and "low estimate" in c["warnings"][0]
    # The other way round: a class with few samples flatters the balanced score, plain agreement decides.
    flattered = Grade(0.88, 0.1, {0: (0.88, 99), 1: (1.0, 1)})
    assert assess({"kegnet/simplex": flattered}, "kegnet/simplex", _grade(0.7), 2, SOURCES)["estimate"] == 0.88


def test_levels_at_the_thresholds_and_never_high_on_noise_alone() -> None:
    assert level(HIGH) == "high" and level(HIGH - 1e-6) == "medium"
    assert level(LOW) == "medium" and level(LOW - 1e-6) == "low"
    assert level(0.999, generator_exam=False) == "medium" and level(LOW - 1e-6, generator_exam=False) == "low"
    assert estimate_of(0.9) == 0.9  # older records without a balanced score
    c = assess({"gaussian": _grade(0.97)}, "gaussian", _grade(0.7), 2, NOISE_ONLY)
    assert c["estimate"] == 0.97 and c["level"] == "medium" and not c["generator_exam"]
    assert "noise samples only" in " | ".join(c["warnings"])


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
    c = assess({}, None, _grade(0.89), 2, SOURCES)
    assert c["estimate"] == 0.89 and c["level"] == "medium" and c["chosen"] is None and c["candidates"] == {}


def test_an_exam_the_levels_were_not_calibrated_on_is_at_most_medium() -> None:
    c = assess({"kegnet/simplex": _grade(0.99)}, "kegnet/simplex", _grade(0.9), 2, SOURCES, calibrated=False)
    assert c["level"] == "medium" and not c["calibrated"] and "at most medium" in " | ".join(c["warnings"])
    assert level(0.99, calibrated=False) == "medium" and level(LOW - 1e-6, calibrated=False) == "low"
    # Matched BatchNorm statistics, or a built-in BatchNorm-free architecture; not an ONNX graph without them.
    assert is_calibrated("timm:lcnet_050", batchnorm_matched=True)
    assert not is_calibrated("timm:lcnet_050", batchnorm_matched=False)
    assert is_calibrated("lenet5", batchnorm_matched=False)
    assert not is_calibrated("onnx", batchnorm_matched=False)
