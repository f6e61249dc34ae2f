"""The common synthetic exam: its composition, grades, and the choice between candidates."""

import pytest
import torch
from torch import nn

from kegnet.distill.exam import (
    Exam,
    Grade,
    build_exam,
    choose,
    confident_part,
    exam_sources,
    generator_part,
    grade,
)
from kegnet.generation import KegNetSampler


class _Echo(nn.Module):
    """A generator that returns its code as the sample (a 'teacher' on codes is then easy to write)."""

    def forward(self, codes: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return codes.clone()


def _teacher(classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(classes, classes)


def test_exam_draws_equal_shares_from_every_source_and_repeats_by_seed() -> None:
    kegnet = KegNetSampler([_Echo(), _Echo()], 4, 3, torch.device("cpu"))
    sources = exam_sources(kegnet, (4,), torch.device("cpu"))
    assert list(sources) == ["kegnet/one_hot", "kegnet/simplex", "kegnet/pairs", "kegnet/sparse", "gaussian",
                             "uniform"]
    exam = build_exam(_teacher(), sources, 600, seed=5, device=torch.device("cpu"))
    assert exam.x.shape == (600, 4) and exam.teacher_logits.shape == (600, 4)
    assert exam.sources == {name: 100 for name in sources}
    one_hot = exam.x[:100]
    assert bool(((one_hot == 0) | (one_hot == 1)).all())
    again = build_exam(_teacher(), sources, 600, seed=5, device=torch.device("cpu"))
    assert torch.equal(exam.x, again.x)
    assert list(exam_sources(None, (4,), torch.device("cpu"))) == ["gaussian", "uniform"]


def test_the_generator_part_keeps_the_generator_samples_in_order() -> None:
    x = torch.arange(8.0).unsqueeze(1)
    exam = Exam(x, x.repeat(1, 2), {"kegnet/one_hot": 3, "gaussian": 2, "kegnet/pairs": 3})
    part = generator_part(exam)
    assert part.sources == {"kegnet/one_hot": 3, "kegnet/pairs": 3}
    assert part.x.flatten().tolist() == [0, 1, 2, 5, 6, 7] and torch.equal(part.teacher_logits, part.x.repeat(1, 2))
    noise_only = Exam(x, x, {"gaussian": 4, "uniform": 4})
    generators_only = Exam(x, x, {"kegnet/one_hot": 8})
    assert generator_part(noise_only) is noise_only and generator_part(generators_only) is generators_only


def test_the_confident_part_keeps_the_samples_the_teacher_is_sure_of() -> None:
    sure, torn = [10.0, 0.0], [0.1, 0.0]  # softmax: 0.99995 and 0.52 for class 0
    logits = torch.tensor([sure, torn, sure, torn, sure])
    exam = Exam(torch.arange(5.0).unsqueeze(1), logits, {"kegnet/pairs": 2, "gaussian": 3})
    part = confident_part(exam, 0.9)
    assert part.x.flatten().tolist() == [0, 2, 4] and part.sources == {"kegnet/pairs": 1, "gaussian": 2}
    torn_only = Exam(torch.zeros(2, 1), torch.tensor([torn, torn]), {"gaussian": 2})
    assert confident_part(torn_only) is torn_only


def test_the_teacher_scores_perfectly_and_a_different_model_does_not() -> None:
    teacher = _teacher()
    exam = build_exam(teacher, exam_sources(None, (4,), torch.device("cpu")), 512, 0, torch.device("cpu"))
    g = grade(teacher, exam)
    assert g.agreement == 1.0 and g.kl == pytest.approx(0.0, abs=1e-6) and g.kl_median == pytest.approx(0.0, abs=1e-6)
    assert sum(n for _, n in g.per_class.values()) == 512 and set(g.per_source) == {"gaussian", "uniform"}
    torch.manual_seed(1)
    other = grade(nn.Linear(4, 4), exam)
    assert other.agreement < 0.9 and other.kl > 0.01 and other.kl_median > 0


def test_the_median_kl_ignores_a_few_samples_far_off_where_the_mean_does_not() -> None:
    """The int8 step's criterion: a model far off on a few exam samples (activations clipped that real inputs
    may never reach) and close on the rest beats one a little off everywhere by the median, not by the mean."""
    teacher = _teacher()
    exam = build_exam(teacher, exam_sources(None, (4,), torch.device("cpu")), 200, 0, torch.device("cpu"))
    with torch.no_grad():
        logits = teacher(exam.x)

    class Off(nn.Module):
        def __init__(self, noise: torch.Tensor) -> None:
            super().__init__()
            self.noise = noise

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return teacher(x) + self.noise[: len(x)]

    g = torch.Generator().manual_seed(0)
    everywhere = 0.5 * torch.randn(logits.shape, generator=g)
    a_few = torch.zeros_like(logits)
    a_few[:10] = 20 * torch.randn(10, logits.shape[1], generator=g)
    grades = {"everywhere": grade(Off(everywhere), exam), "a few": grade(Off(a_few), exam)}
    assert grades["a few"].kl > grades["everywhere"].kl and grades["a few"].kl_median < grades["everywhere"].kl_median
    assert choose(grades, by="kl") == "everywhere" and choose(grades, by="kl_median") == "a few"
    assert choose({"old": Grade(0.9, 0.1), "new": Grade(0.9, 0.2, kl_median=0.01)}, by="kl_median") == "new"


def test_choice_is_best_agreement_then_lowest_kl_among_near_ties() -> None:
    grades = {"a": Grade(0.90, 0.10), "b": Grade(0.903, 0.05), "c": Grade(0.80, 0.01)}
    assert choose(grades) == "b"
    assert choose({"a": Grade(0.90, 0.02), "b": Grade(0.903, 0.05)}) == "a"  # within the tie: lower KL
    assert choose({"a": Grade(0.90, 0.02), "b": Grade(0.95, 0.05)}) == "b"


def test_by_default_a_student_right_only_on_the_commonest_class_loses() -> None:
    # 90 exam samples of class 0, 10 of class 1: "lopsided" gets all of class 0 and none of class 1.
    lopsided = Grade(0.90, 0.2, {0: (1.0, 90), 1: (0.0, 10)})
    even = Grade(0.85, 0.3, {0: (0.85, 90), 1: (0.85, 10)})
    assert lopsided.balanced == 0.5 and even.balanced == pytest.approx(0.85)
    assert choose({"lopsided": lopsided, "even": even}) == "even"
    assert choose({"lopsided": lopsided, "even": even}, by="agreement") == "lopsided"
