"""INT8 of an exported ONNX model, calibrated on synthetic samples: on the paper's trained LeNet-5 (a random
network's logits sit too close together for top-class agreement to mean anything)."""

from pathlib import Path

import pytest
import torch

from kegnet import export, load_teacher
from kegnet.compression import quantize
from kegnet.distill.exam import MIN_SURE_SAMPLES, SURE, build_exam, exam_sources
from tests.conftest import LENET_SPEC, MNIST_TEACHER, needs_shared

pytest.importorskip("onnxruntime")
pytestmark = needs_shared(MNIST_TEACHER)


@pytest.fixture(scope="module")
def lenet(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path, object, torch.Tensor]:
    """The teacher, its student.onnx, a synthetic exam (noise sources) and Gaussian calibration samples."""
    torch.set_num_threads(1)
    teacher = load_teacher(MNIST_TEACHER, LENET_SPEC).eval()
    fp32 = tmp_path_factory.mktemp("lenet") / "student.onnx"
    assert export.export_onnx(teacher, LENET_SPEC.input_shape, fp32, traced=True) is None  # the faster exporter
    cpu = torch.device("cpu")
    exam = build_exam(teacher, exam_sources(None, LENET_SPEC.input_shape, cpu), 256, 1, cpu)
    calibration = torch.randn(128, *LENET_SPEC.input_shape, generator=torch.Generator().manual_seed(2))
    return teacher, fp32, exam, calibration


def test_the_int8_model_is_written_smaller_and_agrees(lenet) -> None:
    teacher, fp32, exam, calibration = lenet
    out = fp32.with_name("student.int8.onnx")
    q = quantize.quantize_job(fp32, out, calibration, "gaussian", exam, LENET_SPEC.input_shape, max_drop=1.0,
                              tolerance=10.0, repeats=3, budget_s=0.05)
    assert q.kept and q.file == "student.int8.onnx" and out.is_file() and q.reason is None
    assert q.bytes["int8"] == out.stat().st_size and q.bytes["fp32"] == fp32.stat().st_size
    assert out.stat().st_size * 3 < fp32.stat().st_size  # int8 weights: about 4x fewer bytes
    assert q.method in quantize.METHODS and set(q.calibration["methods"]) == set(quantize.METHODS)
    assert q.calibration["source"] == "gaussian" and q.calibration["samples"] == 128
    assert q.calibration["equalization"]["pairs"] == 0  # the teacher itself: no factorized layer to equalize
    assert set(q.latency_ms) == {"fp32", "int8"} and q.latency_ms["int8"]["batch64_ms"] > 0
    # It loads in onnxruntime and predicts what the fp32 model predicts on samples it was not calibrated on.
    x = torch.randn(200, *LENET_SPEC.input_shape, generator=torch.Generator().manual_seed(3))
    int8, fp = quantize.OnnxModel(out)(x), quantize.OnnxModel(fp32)(x)
    assert int8.shape == (200, 10)
    assert (int8.argmax(1) == fp.argmax(1)).float().mean() >= 0.95
    assert q.exam_agreement["fp32"] == pytest.approx(1.0, abs=0.01)  # the fp32 file is the teacher itself
    assert q.exam_agreement["drop"] == pytest.approx(q.exam_agreement["fp32"] - q.exam_agreement["int8"])


def test_the_job_keeps_fp32_only_when_the_agreement_bound_is_not_met(lenet, tmp_path: Path) -> None:
    _, fp32, exam, calibration = lenet
    out = tmp_path / "student.int8.onnx"
    # A bound no model can meet: the int8 model would have to agree better than the fp32 one by a whole exam.
    q = quantize.quantize_job(fp32, out, calibration, "gaussian", exam, LENET_SPEC.input_shape, max_drop=-1.0,
                              tolerance=10.0, repeats=3, budget_s=0.05)
    assert not q.kept and q.file is None and not out.exists()
    assert "agreement with the teacher on the synthetic" in q.reason and "fell by" in q.reason
    assert q.check["max_drop"] == -1.0 and q.check["drop"] == pytest.approx(q.check["fp32"] - q.check["int8"])
    assert list(tmp_path.iterdir()) == []  # no working files left behind
    assert q.bytes["int8"] < q.bytes["fp32"]  # still measured, for the report


def _int8_slower(*args, **kwargs) -> dict[str, dict[str, float]]:
    """time_in_turns on a CPU where int8 runs twice as slow as fp32 at every batch."""
    fp32 = {"batch1_ms": 1.0, "batch1_min_ms": 1.0, "batch64_ms": 10.0, "batch64_min_ms": 10.0}
    return {"fp32": fp32, "int8": {k: 2 * v for k, v in fp32.items()}}


@pytest.mark.parametrize("keep_slower", [False, True])
def test_a_slower_int8_model_is_kept_only_when_asked(lenet, tmp_path: Path, monkeypatch, keep_slower: bool) -> None:
    _, fp32, exam, calibration = lenet
    monkeypatch.setattr(quantize, "time_in_turns", _int8_slower)
    out = tmp_path / "student.int8.onnx"
    q = quantize.quantize_job(fp32, out, calibration, "gaussian", exam, LENET_SPEC.input_shape, max_drop=1.0,
                              tolerance=0.05, repeats=3, budget_s=0.05, keep_slower=keep_slower)
    slower = "it ran slower than the fp32 model at batch 1 in onnxruntime (2 ms against 1 ms)"
    assert q.kept == out.is_file() == keep_slower
    assert (q.slower, q.reason) == ((slower, None) if keep_slower else (None, slower))
    # The agreement check still applies when slower models are kept.
    q = quantize.quantize_job(fp32, tmp_path / "refused.int8.onnx", calibration, "gaussian", exam,
                              LENET_SPEC.input_shape, max_drop=-1.0, tolerance=0.05, repeats=3, budget_s=0.05,
                              keep_slower=keep_slower)
    assert not q.kept and "fell by" in q.reason and q.slower is None


def test_the_check_reads_the_samples_the_teacher_is_sure_of(lenet) -> None:
    teacher, _, exam, _ = lenet
    part, on = quantize.check_part(exam)  # noise samples: this teacher is sure of a few of them at most
    sure = (exam.teacher_logits.softmax(1).amax(1) >= SURE).sum().item()
    if sure >= MIN_SURE_SAMPLES:
        assert len(part.x) == sure and on.startswith("exam samples the teacher")
    else:
        assert part is exam and on == "whole exam"
    # An exam of samples the teacher is sure of (its own inputs made larger) is read on that part only.
    x = torch.cat([exam.x, 4 * exam.x])
    with torch.no_grad():
        logits = teacher(x)
    from kegnet.distill.exam import Exam

    wide = Exam(x, logits, {"a": len(exam.x), "b": len(exam.x)})
    part, on = quantize.check_part(wide)
    n = int((logits.softmax(1).amax(1) >= SURE).sum())
    assert n >= MIN_SURE_SAMPLES and len(part.x) == n < len(x) and on != "whole exam"
    assert (part.teacher_logits.softmax(1).amax(1) >= SURE).all()


def test_time_in_turns_reports_each_model_and_batch(lenet) -> None:
    _, fp32, _, _ = lenet
    t = quantize.time_in_turns({"a": fp32, "b": fp32}, LENET_SPEC.input_shape, repeats=3, budget_s=0.01)
    assert set(t) == {"a", "b"}
    assert set(t["a"]) == {"batch1_ms", "batch1_min_ms", "batch64_ms", "batch64_min_ms"}
    assert 0 < t["a"]["batch1_min_ms"] <= t["a"]["batch1_ms"]


def test_weights_use_7_bits_unless_the_full_range_is_asked(lenet, tmp_path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    _, fp32, _, calibration = lenet
    quantize.prepare(fp32, tmp_path / "prepared.onnx")

    def widest_weight(reduce_range: bool) -> int:
        path = tmp_path / f"{reduce_range}.onnx"
        quantize.quantize(tmp_path / "prepared.onnx", path, calibration, "minmax", reduce_range)
        weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
                   if t.data_type == onnx.TensorProto.INT8]
        return max(int(np.abs(w.astype(np.int32)).max()) for w in weights if w.size > 1)

    assert widest_weight(False) == 127  # per-channel symmetric: each channel's largest weight maps to +-127
    assert widest_weight(True) <= 64  # 7 bits: +-63 (onnxruntime's reduce_range)


def test_every_calibration_method_gives_its_own_ranges(lenet, tmp_path: Path) -> None:
    """Entropy through quantize_static alone would be the MinMax model byte for byte (128 bins, one candidate)."""
    _, fp32, _, calibration = lenet
    quantize.prepare(fp32, tmp_path / "prepared.onnx")
    files = {}
    for method in quantize.METHODS:
        quantize.quantize(tmp_path / "prepared.onnx", tmp_path / f"{method}.onnx", calibration, method)
        files[method] = (tmp_path / f"{method}.onnx").read_bytes()
    assert len(set(files.values())) == len(quantize.METHODS)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["prepared.onnx", *(f"{m}.onnx" for m in files)])


@pytest.mark.parametrize("count", [100, 97])
def test_any_calibration_sample_count_quantizes_with_every_method(lenet, tmp_path: Path, count: int) -> None:
    """compression.quantize_samples allows counts that 64-sample batches do not divide; onnxruntime's histogram
    calibrators (Entropy, Percentile) stack every batch's activations and fail on a shorter last one."""
    _, fp32, _, calibration = lenet
    quantize.prepare(fp32, tmp_path / "prepared.onnx")
    for method in quantize.METHODS:
        quantize.quantize(tmp_path / "prepared.onnx", tmp_path / f"{method}.onnx", calibration[:count], method)
        assert (tmp_path / f"{method}.onnx").stat().st_size > 0
    assert count % quantize.calibration_batch(count) == 0


def test_calibration_batches_are_equal_and_as_large_as_allowed() -> None:
    assert [quantize.calibration_batch(n) for n in (512, 100, 97, 30, 64)] == [64, 50, 1, 30, 64]


def test_bias_correction_changes_the_kept_model_and_is_reported(lenet, tmp_path: Path) -> None:
    _, fp32, exam, calibration = lenet
    files = {}
    for corrected in (False, True):
        out = tmp_path / f"{corrected}.int8.onnx"
        q = quantize.quantize_job(fp32, out, calibration, "gaussian", exam, LENET_SPEC.input_shape, max_drop=1.0,
                                  tolerance=10.0, repeats=3, budget_s=0.05, bias_correction=corrected)
        assert q.kept
        files[corrected] = out.read_bytes()
        assert ("bias_correction" in q.calibration) == corrected
    assert q.calibration["bias_correction"]["layers"] == 5  # LeNet-5's two convs and three linears
    assert len(files[True]) == len(files[False]) and files[True] != files[False]  # only bias values moved


def test_adaptive_rounding_changes_the_kept_models_weights_and_is_reported(lenet, tmp_path: Path) -> None:
    _, fp32, exam, calibration = lenet
    files, reports = {}, {}
    for rounding in ("nearest", "adaptive"):
        out = tmp_path / f"{rounding}.int8.onnx"
        q = quantize.quantize_job(fp32, out, calibration, "gaussian", exam, LENET_SPEC.input_shape, max_drop=1.0,
                                  tolerance=10.0, repeats=3, budget_s=0.05, rounding=rounding)
        assert q.kept
        files[rounding], reports[rounding] = out.read_bytes(), q.calibration["rounding"]
    assert reports["nearest"] == {"method": "nearest"}
    assert reports["adaptive"]["method"] == "adaptive" and reports["adaptive"]["layers"] == 5
    assert reports["adaptive"]["error_adaround"] < reports["adaptive"]["error_nearest"]
    assert len(files["adaptive"]) == len(files["nearest"]) and files["adaptive"] != files["nearest"]


def test_the_job_chooses_among_the_candidates_its_check_passes(lenet, tmp_path: Path, monkeypatch) -> None:
    """A candidate the exam ranks first but the check refuses (here: ranges calibrated on samples 100x too small,
    so that most activations clip) is passed over for one the check lets through."""
    from kegnet.distill.exam import Grade

    _, fp32, exam, calibration = lenet
    quantize.prepare(fp32, tmp_path / "prepared.onnx")
    quantize.quantize(tmp_path / "prepared.onnx", tmp_path / "good.onnx", calibration, "minmax")
    quantize.quantize(tmp_path / "prepared.onnx", tmp_path / "clipped.onnx", calibration * 0.01, "minmax")
    choice = quantize.Int8Choice(
        "clipped", {"good": Grade(0.9, 0.2, kl_median=0.2), "clipped": Grade(0.5, 0.1, kl_median=0.01)},
        {"good": tmp_path / "good.onnx", "clipped": tmp_path / "clipped.onnx"}, {"": tmp_path / "prepared.onnx"},
        None)
    monkeypatch.setattr(quantize, "best_int8", lambda *args, **kwargs: choice)
    q = quantize.quantize_job(fp32, tmp_path / "out.int8.onnx", calibration, "gaussian", exam,
                              LENET_SPEC.input_shape, max_drop=0.05, tolerance=10.0, repeats=3, budget_s=0.05)
    assert q.calibration["passing_check"] == ["good"] and q.method == "good" and q.kept
