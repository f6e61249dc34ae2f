import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kegnet import Cancelled, ModelSpec, load_student, run_pipeline
from kegnet.hashing import sha256_file
from tests.conftest import tiny_config


@pytest.mark.parametrize("method", ["kegnet", "gaussian", "uniform", "tucker-only"])
def test_every_method_produces_a_loadable_student(tmp_path: Path, small_cnn, small_cnn_spec, method: str) -> None:
    events = []
    result = run_pipeline(small_cnn, small_cnn_spec, tiny_config(method), tmp_path, device="cpu", seed=1,
                          progress=events.append)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["compression_ratio"] > 1 and m["parameters"]["student"] < m["parameters"]["teacher"]
    assert (m["format"], m["version"], m["task"]) == ("kegnet.run-report", 2, "classify") and m["sequence"] is None
    assert m["classify"]["macs"]["student"] > 0
    assert list(m["timings_s"]) == ["load", "plan", "generators", "decompose", "finetune", "export"]
    assert list(dict.fromkeys(e.stage for e in events)) == [*m["timings_s"], "done"]  # every stage, in order
    samples = {"samples.png"} if method == "kegnet" else set()  # what the generators make, for image inputs
    assert set(m["files"]) == {"student.safetensors", "student.pt2", "student.onnx", "curves.png", *samples}
    for name, info in m["files"].items():
        assert sha256_file(tmp_path / name) == info["sha256"]
    assert (m["agreement"] is None) == (method == "tucker-only")
    if m["agreement"] is not None:
        assert 0.0 <= m["agreement"]["final"] <= 1.0 and "synthetic exam" in m["agreement"]["measure"]
    assert m["speed"]["unit"] == "ms" and set(m["speed"]["student"]) == set(m["speed"]["teacher"]) != set()
    planned = [p["name"] for p in m["classify"]["plan"]["layers"]]
    assert planned and "conv1" not in planned  # default: every conv but the first
    progress = [e.progress for e in events]
    assert progress == sorted(progress) and events[-1].stage == "done"

    x = torch.randn(5, *small_cnn_spec.input_shape)
    reloaded = load_student(tmp_path)
    program = torch.export.load(str(tmp_path / "student.pt2")).module()
    with torch.no_grad():
        assert torch.allclose(reloaded(x), result.student(x), atol=1e-6)
        assert torch.allclose(program(x), result.student(x), atol=1e-5)
        assert program(torch.randn(17, *small_cnn_spec.input_shape)).shape == (17, 3)  # dynamic batch


def test_onnx_model_matches_the_student(tmp_path: Path, small_cnn, small_cnn_spec) -> None:
    ort = pytest.importorskip("onnxruntime")
    result = run_pipeline(small_cnn, small_cnn_spec, tiny_config("tucker-only"), tmp_path, device="cpu", seed=0)
    session = ort.InferenceSession(str(tmp_path / "student.onnx"))
    assert [i.name for i in session.get_inputs()] == ["x"]
    for batch in (1, 9):  # dynamic batch size
        x = torch.randn(batch, *small_cnn_spec.input_shape)
        (logits,) = session.run(["logits"], {"x": x.numpy()})
        with torch.no_grad():
            assert torch.allclose(torch.from_numpy(logits), result.student(x), atol=1e-5)


def test_onnx_is_optional(tmp_path: Path, small_cnn, small_cnn_spec) -> None:
    cfg = tiny_config("tucker-only").model_copy(update={"export_onnx": False})
    result = run_pipeline(small_cnn, small_cnn_spec, cfg, tmp_path, device="cpu", seed=0)
    assert "student.onnx" not in result.report.files and result.report.classify.onnx_skipped is None


def test_vector_teacher_and_fixed_transfer_set(tmp_path: Path) -> None:
    spec = ModelSpec(arch="mlp", arch_kwargs={"hidden": [32, 32]}, input_shape=(16,), num_classes=10)
    torch.manual_seed(0)
    from kegnet import create_model

    teacher = create_model("mlp", input_shape=(16,), num_classes=10, hidden=[32, 32])
    save_file(teacher.state_dict(), str(tmp_path / "t.safetensors"))
    cfg = tiny_config(distill={"transfer": "fixed"}, compression={"rank_method": "explicit",
                                                                 "ranks": {"*": [5, 5]}})
    result = run_pipeline(tmp_path / "t.safetensors", spec, cfg, tmp_path / "out", device="cpu", seed=0)
    assert [(p["name"], p["in_rank"]) for p in result.report.classify.plan["layers"]] == [("layers.0", 5),
                                                                                         ("layers.3", 5)]


def test_cancel_stops_between_steps(tmp_path: Path, small_cnn, small_cnn_spec) -> None:
    calls = []

    def should_cancel() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        run_pipeline(small_cnn, small_cnn_spec, tiny_config(), tmp_path, device="cpu", seed=0,
                     should_cancel=should_cancel)
    assert not (tmp_path / "manifest.json").exists()


def test_passing_trained_generators_gives_the_same_student(tmp_path: Path) -> None:
    # The student has dropout (global RNG): fine-tuning must not depend on whether the generators were
    # trained in this run or handed in (the bench reuses them across settings and runs).
    spec = ModelSpec(arch="mlp", arch_kwargs={"hidden": [32, 32], "dropout": 0.2}, input_shape=(16,),
                     num_classes=10)
    from kegnet import create_model

    torch.manual_seed(0)
    teacher = create_model("mlp", input_shape=(16,), num_classes=10, hidden=[32, 32], dropout=0.2)
    cfg = tiny_config("kegnet", compression={"rank_method": "explicit", "ranks": {"*": [5, 5]}})
    first = run_pipeline(teacher, spec, cfg, tmp_path / "a", device="cpu", seed=3)
    second = run_pipeline(teacher, spec, cfg, tmp_path / "b", device="cpu", seed=3, generators=first.generators)
    for (name, a), b in zip(first.student.state_dict().items(), second.student.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("codes", ["one_hot", "simplex", "pairs", "sparse"])
def test_the_student_learns_from_the_configured_class_codes(tmp_path: Path, small_cnn, small_cnn_spec,
                                                            monkeypatch: pytest.MonkeyPatch, codes: str) -> None:
    from kegnet.tasks import classify

    trained_on: list[object] = []
    original = classify.distill

    def spy(teacher, student, sampler, config, **kwargs):  # type: ignore[no-untyped-def]
        trained_on.append(sampler)
        return original(teacher, student, sampler, config, **kwargs)

    monkeypatch.setattr(classify, "distill", spy)
    result = run_pipeline(small_cnn, small_cnn_spec, tiny_config(distill={"label_codes": codes}), tmp_path,
                          device="cpu", seed=0)
    assert [getattr(s, "codes", None) for s in trained_on] == [codes]
    assert result.report.classify.recipe == f"kegnet/{codes}"


def test_recipes_give_one_student_each_and_the_exam_picks_one(tmp_path: Path, small_cnn, small_cnn_spec) -> None:
    recipes = [{"codes": "pairs", "noise_share": 0.5}, {"codes": "one_hot"}, {"source": "gaussian"}]
    cfg = tiny_config(distill={"recipes": recipes})
    result = run_pipeline(small_cnn, small_cnn_spec, cfg, tmp_path / "all", device="cpu", seed=2)
    conf = result.report.classify.confidence.model_dump()
    names = ["kegnet/pairs+noise0.5", "kegnet/one_hot", "gaussian"]
    assert list(result.candidates) == names == list(conf["candidates"])
    best = max(c["balanced"] for c in conf["candidates"].values())
    chosen = conf["candidates"][conf["chosen"]]
    assert conf["chosen"] == result.report.classify.recipe and chosen["balanced"] >= best - 0.005  # ties go by KL
    assert conf["estimate"] == min(chosen["agreement"], chosen["balanced"]) and conf["generator_exam"]
    assert conf["calibrated"]  # a BatchNorm teacher whose statistics the generators matched
    assert result.student is result.candidates[conf["chosen"]]
    assert conf["exam"]["samples"] >= 64 and set(conf["exam"]["sources"]) >= {"kegnet/one_hot", "gaussian"}

    # A candidate is the same student whether trained among others or alone (same generators, same seeds).
    alone = run_pipeline(small_cnn, small_cnn_spec, tiny_config(distill={"recipes": [recipes[1]]}), tmp_path / "one",
                         device="cpu", seed=2, generators=result.generators)
    for (name, a), b in zip(alone.student.state_dict().items(),
                            result.candidates["kegnet/one_hot"].state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_an_eval_set_is_reported_but_never_chooses(tmp_path: Path, small_cnn, small_cnn_spec) -> None:
    x = torch.randn(40, *small_cnn_spec.input_shape)
    with torch.no_grad():
        y = small_cnn(x).argmax(1)
    y[:10] = (y[:10] + 1) % 3  # the teacher is wrong on a quarter
    save_file({"x": x, "y": y}, str(tmp_path / "eval.safetensors"))
    cfg = tiny_config(distill={"recipes": [{"codes": "one_hot"}, {"source": "uniform"}]})
    with_set = run_pipeline(small_cnn, small_cnn_spec, cfg, tmp_path / "a", device="cpu", seed=0,
                            eval_set=tmp_path / "eval.safetensors")
    ev = with_set.report.classify.evaluation.model_dump()
    assert ev["samples"] == 40 and ev["teacher_accuracy"] == pytest.approx(0.75)
    assert set(ev["candidates"]) == {"kegnet/one_hot", "uniform"}
    assert ev["student_accuracy"] == ev["candidates"][with_set.report.classify.recipe]
    assert sum(c["samples"] for c in ev["student_per_class"].values()) == 40
    without = run_pipeline(small_cnn, small_cnn_spec, cfg, tmp_path / "b", device="cpu", seed=0)
    assert without.report.classify.evaluation is None
    assert without.report.classify.recipe == with_set.report.classify.recipe


def test_a_bad_eval_set_fails_in_the_load_stage(tmp_path: Path, small_cnn, small_cnn_spec) -> None:
    from kegnet.errors import SpecError

    save_file({"x": torch.randn(4, 5), "y": torch.zeros(4, dtype=torch.long)}, str(tmp_path / "bad.safetensors"))
    events = []
    with pytest.raises(SpecError, match="shape"):
        run_pipeline(small_cnn, small_cnn_spec, tiny_config(), tmp_path / "out", device="cpu",
                     eval_set=tmp_path / "bad.safetensors", progress=events.append)
    assert {e.stage for e in events} <= {"load"}


@pytest.mark.parametrize("stage", ["plan", "export"])
def test_cancel_ends_a_long_timing_stage_within_seconds(tmp_path: Path, small_cnn, small_cnn_spec, stage: str) -> None:
    # Timing budgets of a minute per measurement: without a check inside the timing loops, cancel would wait.
    cfg = tiny_config("tucker-only", compression={"latency_repeats": 1000, "latency_budget_s": 60.0})
    asked: list[float] = []

    def progress(event) -> None:
        if event.stage == stage and not asked:
            asked.append(time.monotonic())

    with pytest.raises(Cancelled):
        run_pipeline(small_cnn, small_cnn_spec, cfg, tmp_path, device="cpu", seed=0, progress=progress,
                     should_cancel=lambda: bool(asked) and time.monotonic() - asked[0] > 0.5)
    assert time.monotonic() - asked[0] < 5.0


def test_the_report_warns_when_every_rank_collapsed_to_one(tmp_path: Path, small_cnn, small_cnn_spec) -> None:
    cfg = tiny_config("tucker-only", compression={"rank_method": "explicit", "ranks": {"*": [1, 1]}})
    result = run_pipeline(small_cnn, small_cnn_spec, cfg, tmp_path, device="cpu", seed=0)
    assert any("every factorized layer has rank 1" in w for w in result.report.warnings)
    assert any(line.startswith("warning: every factorized layer has rank 1") for line in result.report.lines())


def test_generators_without_the_batchnorm_prior_are_not_calibrated(tmp_path: Path, small_cnn, small_cnn_spec) -> None:
    # Samples that did not match the teacher's statistics can be easy and unlike the data: never "high".
    cfg = tiny_config(generator={"batchnorm_prior": 0.0}, distill={"steps": 0})
    conf = run_pipeline(small_cnn, small_cnn_spec, cfg, tmp_path, device="cpu", seed=0).report.classify.confidence
    assert conf.calibrated is False and conf.level != "high"
