"""How sure we are of a student without data: the manifest's ``confidence`` section, from exam grades.

The estimate is the lower of two grades of the chosen student on the synthetic exam (``kegnet.distill.exam``):
its agreement with the teacher, and its balanced agreement (the mean over the teacher's classes). The lower
of the two: plain agreement is flattered by a student right on the exam's commonest classes only, balanced
agreement by a class with few samples. "High" also needs generator samples on the exam: on noise alone a
student trained on noise is graded on its own kind of samples. And it needs generators the calibration
covers (``calibrated``): ones that matched the teacher's BatchNorm statistics, or the built-in BatchNorm-free
architectures (LeNet-5, the MLP) every recorded "high" student without them came from. Elsewhere (an ONNX
graph whose BatchNorm was folded, a library network without BatchNorm, ``batchnorm_prior`` 0) the exam's
samples can be easy for the student and still unlike the real inputs: an exported timm lcnet_050 scored
0.99 on the exam and lost 3.8 points on real data (docs/benchmarks.md, "an ONNX teacher with no options").

Warnings name what a user should look at: a low estimate, an exam of noise only, fine-tuning that made the
student worse than the plain decomposition, a recipe far below another, classes the student gets wrong on
the exam, classes the exam has no sample of.
"""

from __future__ import annotations

from typing import Any

from kegnet.distill.exam import Grade

# Thresholds on the estimate (fractions), fitted by ``python -m bench calibration`` on every recorded student
# (docs/benchmarks.md, "confidence calibration"): "high" 0.02 above the best estimate of any student that lost
# more than 2 points of real accuracy, "low" 0.02 above that of any student that lost more than 5.
LOW = 0.87
HIGH = 0.91
# BatchNorm-free built-in architectures with recorded "high" students (docs/benchmarks.md): without BatchNorm
# statistics to match, only their exams are calibrated.
CALIBRATED_WITHOUT_PRIOR = frozenset({"lenet5", "mlp"})
FAR_BELOW = 0.05  # a candidate this far below the best is flagged
WEAK_CLASS = 0.5  # a class whose exam samples agree less than this is named
MIN_CLASS_SAMPLES = 10


def estimate_of(agreement: float, balanced: float | None = None) -> float:
    """The estimate from a student's exam agreement and balanced agreement (agreement alone when the
    balanced score is unknown)."""
    return agreement if balanced is None else min(agreement, balanced)


def level(estimate: float, generator_exam: bool = True, calibrated: bool = True) -> str:
    """``high``, ``medium`` or ``low``; never ``high`` when the exam had no generator samples
    (``generator_exam`` False: a job without generators, graded on noise only) or came from generators the
    calibration does not cover (``calibrated`` False, see ``is_calibrated``)."""
    if estimate < LOW:
        return "low"
    return "high" if estimate >= HIGH and generator_exam and calibrated else "medium"


def is_calibrated(arch: str, batchnorm_matched: bool) -> bool:
    """Whether a job's exam is of a kind the levels were calibrated on: its generators matched the teacher's
    BatchNorm statistics (``batchnorm_matched``), or the teacher is a built-in BatchNorm-free architecture."""
    return batchnorm_matched or arch in CALIBRATED_WITHOUT_PRIOR


def assess(candidates: dict[str, Grade], chosen: str | None, before: Grade, num_classes: int,
           exam_sources: dict[str, int], calibrated: bool = True) -> dict[str, Any]:
    """The ``confidence`` section. ``candidates``: exam grades of the fine-tuned students by recipe name
    (empty when nothing was fine-tuned: the decomposed student is the result); ``before``: the decomposed
    student's grade, before any fine-tuning; ``calibrated``: see ``is_calibrated``."""
    final = candidates[chosen] if chosen is not None else before
    estimate = estimate_of(final.agreement, final.balanced)
    generator_exam = any(name.startswith("kegnet/") for name in exam_sources)
    warnings: list[str] = []
    if generator_exam and not calibrated and estimate >= HIGH:
        warnings.append("the generators had no BatchNorm statistics of the teacher to match (an ONNX graph with "
                        "BatchNorm folded into its convs, a network without BatchNorm, or "
                        "generator.batchnorm_prior 0), so their samples may be unlike your data however well the "
                        "student agrees on them: the level is at most medium. Check the student on labelled data "
                        "(--eval-set) before you deploy it")
    if estimate < LOW:
        warnings.append(f"low estimate: the student agrees with the teacher on {100 * final.agreement:.1f}% of "
                        f"the synthetic exam ({100 * final.balanced:.1f}% over the teacher's classes); expect it "
                        "to lose accuracy on real data. Try a lower compression ratio, more distill.steps, or "
                        "compare recipes (distill.recipes)")
    if not generator_exam and estimate >= HIGH:
        warnings.append("the exam held noise samples only (no generators in this job): the estimate says nothing "
                        "about inputs like the teacher's data, so the level is at most medium")
    if chosen is not None and final.agreement < before.agreement - FAR_BELOW:
        warnings.append(f"fine-tuning lowered the exam agreement from {100 * before.agreement:.1f}% (the "
                        f"decomposed student) to {100 * final.agreement:.1f}%")
    best = max((g.agreement for g in candidates.values()), default=final.agreement)
    far = sorted(name for name, g in candidates.items() if g.agreement < best - FAR_BELOW)
    if far:
        warnings.append(f"recipes far below the best ({100 * best:.1f}%): " + ", ".join(
            f"{name} {100 * candidates[name].agreement:.1f}%" for name in far))
    weak = sorted(c for c, (a, n) in final.per_class.items() if a < WEAK_CLASS and n >= MIN_CLASS_SAMPLES)
    if weak:
        warnings.append("classes the student often gets wrong on the exam: " + ", ".join(
            f"{c} ({100 * final.per_class[c][0]:.0f}%)" for c in weak))
    unseen = [c for c in range(num_classes) if c not in final.per_class]
    if unseen:
        warnings.append(f"the teacher predicts no exam sample as class {', '.join(map(str, unseen))}: the "
                        "student is unchecked there")
    return {
        "estimate": estimate,
        "level": level(estimate, generator_exam, calibrated),
        "agreement": final.agreement,
        "kl": final.kl,
        "chosen": chosen,
        "per_class": final.to_dict()["per_class"],
        "per_source": final.per_source,
        "before_finetune": {"agreement": before.agreement, "kl": before.kl},
        "balanced": final.balanced,
        "candidates": {name: {"agreement": g.agreement, "balanced": g.balanced, "kl": g.kl,
                              "per_source": g.per_source, "chosen": name == chosen, "far_below_best": name in far}
                       for name, g in candidates.items()},
        "exam": {"samples": sum(exam_sources.values()), "sources": exam_sources},
        "thresholds": {"low": LOW, "high": HIGH, "far_below": FAR_BELOW},
        "generator_exam": generator_exam,
        "calibrated": calibrated,
        "warnings": warnings,
    }
