"""Tiny pipeline runs with each distillation objective, and with several teachers."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kegnet import KegnetError, ModelSpec, create_model, run_pipeline
from kegnet.errors import CheckpointError
from tests.conftest import tiny_config

SPEC = ModelSpec(arch="resnet", arch_kwargs={"depth": 8, "widths": [4, 8]}, input_shape=(1, 12, 12), num_classes=3)
MLP_SPEC = ModelSpec(arch="mlp", arch_kwargs={"hidden": [16, 16]}, input_shape=(8,), num_classes=3)


def cnn(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(SPEC.arch, input_shape=SPEC.input_shape, num_classes=SPEC.num_classes,
                        **SPEC.kwargs()).eval()


def config(method: str = "kegnet", **distill: object):
    cfg = tiny_config(method, distill=distill)
    return cfg.model_copy(update={"export_portable": False, "export_onnx": False})


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)  # module-scoped: set up before the per-test thread fixture
    return run_pipeline(cnn(0), SPEC, config(), tmp_path_factory.mktemp("base"), device="cpu", seed=1)


@pytest.mark.parametrize("objective", [
    {"hard_label_weight": 1.0},
    {"rkd_distance_weight": 1.0, "rkd_angle_weight": 2.0},
    {"rkd_distance_weight": 1.0, "rkd_on": "logits"},
    {"self_distill_weight": 1.0, "self_distill_mmd_weight": 1.0, "distortion_strength": 1.0},
])
def test_each_objective_runs_and_enters_the_loss(tmp_path: Path, baseline, objective: dict) -> None:
    result = run_pipeline(cnn(0), SPEC, config(**objective), tmp_path, device="cpu", seed=1)
    losses = [r["loss"] for r in result.report.classify.distill_curve[1:]]
    assert all(loss == loss for loss in losses)  # no NaN
    assert losses != [r["loss"] for r in baseline.report.classify.distill_curve[1:]]
    assert result.report.config["distill"] | objective == result.report.config["distill"]


def test_one_teacher_in_a_list_is_the_same_job(tmp_path: Path, baseline) -> None:
    result = run_pipeline([cnn(0)], SPEC, config(ensemble_weighting="entropy"), tmp_path, device="cpu", seed=1)
    assert result.report.classify.teachers.model_dump() == {"count": 1, "weighting": "mean", "student_from": 0,
                                                            "agreement_with_ensemble": None}
    # [0] has a NaN loss
    assert result.report.classify.distill_curve[1:] == baseline.report.classify.distill_curve[1:]
    for a, b in zip(result.student.state_dict().values(), baseline.student.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_two_teachers_entropy_weighting_and_best_base(tmp_path: Path) -> None:
    teachers = [cnn(0), cnn(5)]
    before = [{k: v.clone() for k, v in t.state_dict().items()} for t in teachers]
    cfg = config(ensemble_weighting="entropy", ensemble_student="best", feature_weight=1.0, rkd_distance_weight=1.0)
    result = run_pipeline(teachers, SPEC, cfg, tmp_path, device="cpu", seed=0)
    t = result.report.classify.teachers.model_dump()
    assert t["count"] == 2 and t["weighting"] == "entropy" and len(t["agreement_with_ensemble"]) == 2
    assert t["student_from"] == max(range(2), key=lambda i: t["agreement_with_ensemble"][i])
    assert result.report.agreement.final >= 0
    for teacher, state in zip(teachers, before, strict=True):  # the callers' teachers are left as they were
        assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in state.items())
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in teacher.modules())


def _mlp_file(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_file(create_model("mlp", input_shape=(8,), num_classes=3, hidden=[16, 16]).state_dict(), str(path))
    return path


def test_teacher_files_with_mc_dropout(tmp_path: Path) -> None:
    files = [_mlp_file(tmp_path / f"t{i}.safetensors", i) for i in range(2)]
    cfg = config(ensemble_weighting="mc_dropout", mc_dropout_passes=2)
    result = run_pipeline(files, MLP_SPEC, cfg, tmp_path / "out", device="cpu", seed=0)
    t = result.report.classify.teachers
    assert t.count == 2 and t.weighting == "mc_dropout"
    assert t.student_from == 0  # ensemble_student "first" by default


def test_bad_teacher_is_named_and_the_count_is_bounded(tmp_path: Path) -> None:
    good = _mlp_file(tmp_path / "good.safetensors", 0)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"checkpoint 2 of 2 \(index 1\): the checkpoint file is empty"):
        run_pipeline([good, empty], MLP_SPEC, config(), tmp_path / "a", device="cpu")
    with pytest.raises(KegnetError, match="1 to 8 teachers"):
        run_pipeline([good] * 9, MLP_SPEC, config(), tmp_path / "b", device="cpu")
