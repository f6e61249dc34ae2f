"""The objectives switched on inside ``distill``: each one changes training in the way it should."""

import copy

import pytest
import torch
from torch import nn

from kegnet.config import DistillConfig
from kegnet.distill import distill
from kegnet.distill.relational import rkd_distance_loss
from kegnet.distill.self_distill import distort, symmetric_kl
from kegnet.generation import NoiseSampler, Sampler
from kegnet.models.taps import BatchNormStatistics, PenultimateTap

CPU = torch.device("cpu")


class ClassZeroSampler(Sampler):
    """Gaussian inputs, every one labelled class 0 (as if a generator had been asked for class 0)."""

    def sample(self, n: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, 8, generator=rng), torch.zeros(n, dtype=torch.long)


def nets(student_width: int = 32) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    student = nn.Sequential(nn.Linear(8, student_width), nn.ReLU(), nn.Linear(student_width, 4))
    return teacher, student


def run(sampler: Sampler, student_width: int = 32, **fields: object) -> tuple[nn.Module, nn.Module]:
    teacher, student = nets(student_width)
    cfg = DistillConfig(steps=60, batch_size=64, lr=3e-3, eval_every=30, holdout_samples=64, select_best=False,
                        **fields)
    distill(teacher, student, sampler, cfg, device=CPU, seed=0)
    return teacher, student


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hinton_hard_labels_pull_the_student_toward_the_sampled_labels() -> None:
    x = torch.randn(512, 8)
    share = []
    for weight in (0.0, 5.0):
        _, student = run(ClassZeroSampler(), hard_label_weight=weight)
        with torch.no_grad():
            share.append((student(x).argmax(1) == 0).float().mean().item())
    assert share[1] > share[0] + 0.3


def test_relational_kd_aligns_features_of_another_width_and_leaves_no_hooks() -> None:
    gaussian = NoiseSampler("gaussian", (8,), CPU)
    x = torch.randn(256, 8)
    losses = []
    for weight in (0.0, 20.0):
        teacher, student = run(gaussian, student_width=12, rkd_distance_weight=weight, rkd_angle_weight=weight)
        assert hooks(teacher) == hooks(student) == 0
        with PenultimateTap(teacher) as t_tap, PenultimateTap(student) as s_tap, torch.no_grad():
            teacher(x)
            student(x)
            losses.append(rkd_distance_loss(s_tap.value, t_tap.value).item())
    assert losses[1] < 0.7 * losses[0]


def test_relational_kd_on_logits_trains() -> None:
    teacher, student = run(NoiseSampler("gaussian", (8,), CPU), rkd_distance_weight=1.0, rkd_on="logits")
    _, plain = run(NoiseSampler("gaussian", (8,), CPU))
    assert not torch.equal(student[0].weight, plain[0].weight)


def test_self_distillation_makes_the_student_consistent_across_views_deterministically() -> None:
    gaussian = NoiseSampler("gaussian", (8,), CPU)
    x = torch.randn(512, 8)
    gaps, students = [], []
    for weight in (0.0, 20.0, 20.0):
        teacher, student = run(gaussian, self_distill_weight=weight, self_distill_mmd_weight=weight,
                               distortion_strength=1.0)
        assert hooks(student) == 0
        students.append(student)
        rng = torch.Generator().manual_seed(5)
        with torch.no_grad():
            gaps.append(symmetric_kl(student(distort(x, 1.0, rng)), student(distort(x, 1.0, rng))).item())
    assert gaps[1] < 0.8 * gaps[0]
    assert all(torch.equal(a, b) for a, b in zip(students[1].state_dict().values(),
                                                 students[2].state_dict().values(), strict=True))


def test_batchnorm_statistics_term_pulls_the_students_statistics_toward_the_running_ones() -> None:
    """The student's BatchNorm inputs on synthetic batches move toward the running (real-data) statistics;
    a student without BatchNorm trains as before."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():  # "real" data lived elsewhere than the Gaussian samples the student sees
        teacher[1].running_mean.fill_(0.5)
        teacher[1].running_var.fill_(2.0)
    x = torch.randn(512, 8)
    distance = []
    for weight in (0.0, 1.0):
        student = copy.deepcopy(teacher)
        cfg = DistillConfig(steps=60, batch_size=64, lr=3e-2, eval_every=30, holdout_samples=64,
                            select_best=False, bn_stats_weight=weight)
        distill(teacher, student, NoiseSampler("gaussian", (8,), CPU), cfg, device=CPU, seed=0)
        assert hooks(student) == 0
        with BatchNormStatistics(student, groups=1) as stats, torch.no_grad():
            student(x)
            distance.append(stats.pop().item())
    assert distance[1] < 0.5 * distance[0]
    _, plain = run(NoiseSampler("gaussian", (8,), CPU))
    _, without_bn = run(NoiseSampler("gaussian", (8,), CPU), bn_stats_weight=1.0)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), without_bn.state_dict().values(),
                                                 strict=True))


def test_trainable_factorized_leaves_the_other_layers_as_they_are() -> None:
    teacher, student = nets()
    before = copy.deepcopy(student.state_dict())
    cfg = DistillConfig(steps=20, batch_size=32, eval_every=10, holdout_samples=64, select_best=False,
                        trainable="factorized")
    distill(teacher, student, NoiseSampler("gaussian", (8,), CPU), cfg, device=CPU, seed=0, feature_layers=["2"])
    after = student.state_dict()
    assert torch.equal(after["0.weight"], before["0.weight"]) and torch.equal(after["0.bias"], before["0.bias"])
    assert not torch.equal(after["2.weight"], before["2.weight"])


def test_ensemble_teacher_goes_through_distill() -> None:
    from kegnet.distill.ensemble import TeacherEnsemble

    teacher, student = nets()
    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    ens = TeacherEnsemble([teacher, other], weighting="entropy", temperature=4.0, base=1)
    cfg = DistillConfig(steps=20, batch_size=32, eval_every=10, holdout_samples=64, feature_weight=1.0,
                        rkd_distance_weight=1.0, transfer="fixed", samples_per_generator=64)
    result = distill(ens, student, NoiseSampler("gaussian", (8,), CPU), cfg, device=CPU, seed=0,
                     feature_layers=["0"])
    assert [r["step"] for r in result.curve] == [0, 10, 20] and hooks(ens) == 0


def test_new_fields_default_to_off_and_are_bounded() -> None:
    from pydantic import ValidationError

    d = DistillConfig()
    assert (d.rkd_distance_weight, d.rkd_angle_weight, d.self_distill_weight, d.self_distill_mmd_weight) == (0, 0, 0, 0)
    assert d.bn_stats_weight == 0
    assert d.ensemble_weighting == "mean" and d.ensemble_student == "first"
    for bad in ({"rkd_distance_weight": -1}, {"rkd_angle_weight": 1e4}, {"rkd_on": "pixels"},
                {"self_distill_weight": 101}, {"self_distill_mmd_weight": -0.1}, {"distortion_strength": 1.5},
                {"ensemble_weighting": "vote"}, {"ensemble_temperature": 0}, {"mc_dropout_passes": 1},
                {"mc_dropout_passes": 33}, {"ensemble_student": "last"}, {"bn_stats_weight": -1},
                {"rkd_angle_weight": 1.0, "batch_size": 2}):
        with pytest.raises(ValidationError):
            DistillConfig(**bad)


def test_decaying_hints_fall_linearly_to_zero_at_the_last_step() -> None:
    from kegnet.distill.train import _decay

    assert [_decay(s, 5) for s in range(1, 6)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert _decay(1, 1) == 1.0  # a one-step pass keeps its hints


@pytest.mark.parametrize("steps", [1, 2])
def test_feature_decay_changes_only_the_steps_after_the_first(steps: int) -> None:
    def trained(decay: bool) -> dict[str, torch.Tensor]:
        teacher, student = nets()
        student.load_state_dict(teacher.state_dict())
        with torch.no_grad():
            student[0].weight.add_(0.5)  # hints have something to pull back
        cfg = DistillConfig(steps=steps, batch_size=32, eval_every=1, holdout_samples=64, select_best=False,
                            feature_weight=10.0, feature_decay=decay)
        distill(teacher, student, NoiseSampler("gaussian", (8,), CPU), cfg, device=CPU, seed=0, feature_layers=["0"])
        return student.state_dict()

    same = all(torch.equal(a, b) for a, b in zip(trained(False).values(), trained(True).values(), strict=True))
    assert same == (steps == 1)
