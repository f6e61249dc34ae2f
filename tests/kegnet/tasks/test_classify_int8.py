"""``compression.quantize: int8`` through the whole classifier job: student.int8.onnx, its report, and the
teacher quantized where no layer is worth factorizing."""

import json
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from pydantic import ValidationError

from kegnet import ClassifierConfig, CompressionError, load_teacher, run_pipeline
from kegnet.compression import quantize
from kegnet.config import SequenceJobConfig
from kegnet.errors import Cancelled
from kegnet.tasks.classify import TASK
from tests.conftest import LENET_SPEC, MNIST_TEACHER, needs_shared, tiny_config

# Loose checks (a tiny budget's student, timings of a busy machine): these tests are about the files and
# the report; tests/kegnet/compression/test_quantize.py checks the bound and the agreement.
LOOSE = {"quantize": "int8", "quantize_samples": 64, "quantize_max_drop": 1.0, "latency_tolerance": 1.0}


def _int8_report(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["classify"]["quantization"]


@needs_shared(MNIST_TEACHER)
def test_a_job_writes_the_int8_student_and_reports_it(tmp_path: Path) -> None:
    teacher = load_teacher(MNIST_TEACHER, LENET_SPEC)
    cfg = tiny_config(compression={"layers": ["conv3"], **LOOSE}).model_copy(update={"export_portable": False})
    result = run_pipeline(teacher, LENET_SPEC, cfg, tmp_path, device="cpu", seed=0)
    q = _int8_report(tmp_path)
    files = json.loads((tmp_path / "manifest.json").read_text())["files"]
    assert q["kept"] == (tmp_path / "student.int8.onnx").is_file() == ("student.int8.onnx" in files)
    assert q["calibration"]["source"] == result.report.classify.recipe  # the kept recipe's mix, never data
    assert q["calibration"]["samples"] == 64 and q["method"] in ("minmax", "entropy", "percentile")
    # conv3's Tucker-2 factors (first -> core -> last, nothing between): two pairs whose ranges were equalized
    assert q["calibration"]["equalization"]["pairs"] == 2
    assert q["bytes"]["fp32"] == files["student.onnx"]["bytes"]
    if q["kept"]:
        session = ort.InferenceSession(str(tmp_path / "student.int8.onnx"))
        x = torch.randn(4, *LENET_SPEC.input_shape)
        assert session.run(None, {"x": x.numpy()})[0].shape == (4, 10)
        assert files["student.int8.onnx"]["bytes"] < files["student.onnx"]["bytes"]
        assert any(line.startswith("int8 model (") for line in result.report.lines())
        assert "student.int8.onnx" in result.report.usage(tmp_path)
    else:
        assert any(w.startswith("kept the fp32 model only") for w in result.report.warnings)


def test_with_no_layer_worth_factorizing_the_teacher_is_quantized(tmp_path: Path, small_cnn, small_cnn_spec) -> None:
    # Ranks above every layer's: no factorization makes a layer smaller, so the plan has nothing to do.
    nothing = {"rank_method": "explicit", "ranks": {"*": [64, 64]}}
    with pytest.raises(CompressionError, match="no layer gets smaller"):
        run_pipeline(small_cnn, small_cnn_spec, tiny_config(compression=nothing), tmp_path / "fp32", device="cpu")
    cfg = tiny_config(compression={**nothing, **LOOSE}).model_copy(update={"export_portable": False})
    TASK.check_model(small_cnn, small_cnn_spec, cfg)  # validation lets it through too
    result = run_pipeline(small_cnn, small_cnn_spec, cfg, tmp_path, device="cpu", seed=0)
    report = result.report
    assert report.compression_ratio == 1.0 and report.classify.plan["layers"] == []
    assert report.classify.distill_curve == [] and report.agreement is None  # nothing to fine-tune
    assert any(w.startswith("no layer was factorized (no layer gets smaller") for w in report.warnings)
    assert report.classify.quantization is not None and report.classify.quantization.exam_agreement["fp32"] == 1.0
    x = torch.randn(3, *small_cnn_spec.input_shape)
    with torch.no_grad():
        assert torch.equal(result.student(x), small_cnn(x))  # the student is the teacher


def test_int8_config_is_validated() -> None:
    assert ClassifierConfig().compression.quantize == "none"
    with pytest.raises(ValidationError, match="set export_onnx true"):
        ClassifierConfig.from_preset("fast", compression={"quantize": "int8"}, export_onnx=False)
    with pytest.raises(ValidationError, match="is for classifiers"):
        SequenceJobConfig(compression={"quantize": "int8"})
    for bad in ({"quantize": "int4"}, {"quantize_samples": 10**6}, {"quantize_max_drop": -0.1},
                {"quantize_finetune_steps": -1}, {"quantize_finetune_steps": 10**6}):
        with pytest.raises(ValidationError):
            ClassifierConfig.from_preset("fast", compression=bad)


def test_a_layer_name_that_matches_nothing_still_fails_with_int8(tmp_path: Path, small_cnn, small_cnn_spec) -> None:
    with pytest.raises(CompressionError, match="'conv9' matches no"):
        run_pipeline(small_cnn, small_cnn_spec, tiny_config(compression={"layers": ["conv9"], **LOOSE}), tmp_path,
                     device="cpu")


def test_a_quantizer_failure_keeps_the_fp32_job_and_says_why(tmp_path: Path, small_cnn, small_cnn_spec,
                                                             monkeypatch) -> None:
    """onnxruntime's quantizer may refuse a graph (or, before calibration_batch, a sample count): the int8 file is
    an extra, so the job still ends with its fp32 model and the report says what failed; a cancel still cancels."""
    nothing = {"rank_method": "explicit", "ranks": {"*": [64, 64]}}  # the teacher is quantized: no fine-tuning
    cfg = tiny_config(compression={**nothing, **LOOSE}).model_copy(update={"export_portable": False})

    def refuse(*args, **kwargs):
        raise ValueError("setting an array element with a sequence")

    monkeypatch.setattr(quantize, "best_int8", refuse)
    result = run_pipeline(small_cnn, small_cnn_spec, cfg, tmp_path / "job", device="cpu", seed=0)
    q = _int8_report(tmp_path / "job")
    assert not q["kept"] and "ValueError: setting an array element" in q["reason"]
    assert (tmp_path / "job" / "student.onnx").is_file() and not (tmp_path / "job" / "student.int8.onnx").exists()
    assert not list((tmp_path / "job").glob(".int8-*"))  # its work folder went with it
    assert any(w.startswith("kept the fp32 model only") and "ValueError" in w for w in result.report.warnings)

    def cancel(*args, **kwargs):
        raise Cancelled

    monkeypatch.setattr(quantize, "best_int8", cancel)
    with pytest.raises(Cancelled):
        run_pipeline(small_cnn, small_cnn_spec, cfg, tmp_path / "cancelled", device="cpu", seed=0)


def test_a_slower_int8_model_kept_on_request_is_written_with_a_warning(tmp_path: Path, small_cnn, small_cnn_spec,
                                                                      monkeypatch) -> None:
    """``quantize_keep_slower``: the int8 file is written although it ran slower; the report and a warning give
    both timings (tests/kegnet/compression/test_quantize.py checks the decision itself)."""
    nothing = {"rank_method": "explicit", "ranks": {"*": [64, 64]}}
    cfg = tiny_config(compression={**nothing, **LOOSE, "latency_tolerance": 0.05, "quantize_keep_slower": True})
    cfg = cfg.model_copy(update={"export_portable": False})
    fp32 = {"batch1_ms": 1.0, "batch1_min_ms": 1.0, "batch64_ms": 10.0, "batch64_min_ms": 10.0}
    slower = {"fp32": fp32, "int8": {key: 3 * ms for key, ms in fp32.items()}}
    monkeypatch.setattr(quantize, "time_in_turns", lambda *args, **kwargs: slower)
    result = run_pipeline(small_cnn, small_cnn_spec, cfg, tmp_path, device="cpu", seed=0)
    q = _int8_report(tmp_path)
    assert q["kept"] and (tmp_path / "student.int8.onnx").is_file() and q["reason"] is None
    assert q["slower"] == "it ran slower than the fp32 model at batch 1 in onnxruntime (3 ms against 1 ms)"
    assert [w for w in result.report.warnings if "quantize_keep_slower" in w] == [
        "kept student.int8.onnx as compression.quantize_keep_slower asks, but on the worker's CPU it ran slower "
        "than the fp32 model at batch 1 in onnxruntime (3 ms against 1 ms): time it on the hardware you deploy to"]


class TimeLimit(Exception):  # noqa: N818 - stands for Celery's SoftTimeLimitExceeded, an Exception too
    """Raised into a job from outside it."""


def test_an_interrupt_the_caller_names_goes_through_the_int8_step(tmp_path: Path, small_cnn, small_cnn_spec,
                                                                  monkeypatch) -> None:
    """The worker's soft time limit must end the job even when it fires inside the int8 step, whose failures
    otherwise keep the fp32 job; unnamed, the same exception is a quantizer failure like any other."""
    nothing = {"rank_method": "explicit", "ranks": {"*": [64, 64]}}
    cfg = tiny_config(compression={**nothing, **LOOSE}).model_copy(update={"export_portable": False})

    def time_up(*args, **kwargs):
        raise TimeLimit

    monkeypatch.setattr(quantize, "best_int8", time_up)
    with pytest.raises(TimeLimit):
        run_pipeline(small_cnn, small_cnn_spec, cfg, tmp_path / "named", device="cpu", seed=0, interrupts=(TimeLimit,))
    run_pipeline(small_cnn, small_cnn_spec, cfg, tmp_path / "unnamed", device="cpu", seed=0)
    assert "TimeLimit" in _int8_report(tmp_path / "unnamed")["reason"]


def test_finetuning_through_int8_rounding_quantizes_a_copy_and_reports_it(tmp_path: Path, small_cnn,
                                                                         small_cnn_spec) -> None:
    """``quantize_finetune_steps``: the int8 model comes from a fine-tuned copy; the job's own fp32 files stay the
    student's. Without generator samples (``tucker-only``: Gaussian calibration) it does not run."""
    cfg = tiny_config(compression={"rank_method": "fraction", "rank_fraction": 0.5, "keep_slower": True, **LOOSE,
                                   "quantize_finetune_steps": 3}).model_copy(update={"export_portable": False})
    result = run_pipeline(small_cnn, small_cnn_spec, cfg, tmp_path / "tuned", device="cpu", seed=0)
    q = _int8_report(tmp_path / "tuned")
    assert q["finetune"]["steps"] == 3 and q["finetune"]["seconds"] > 0
    assert q["calibration"]["source"].startswith("kegnet")
    assert not list((tmp_path / "tuned").glob(".qat-*"))  # the copy's file went with its folder
    x = torch.randn(4, *small_cnn_spec.input_shape)
    session = ort.InferenceSession(str(tmp_path / "tuned" / "student.onnx"))
    with torch.no_grad():  # student.onnx is the job's student, not the tuned copy
        assert torch.allclose(torch.from_numpy(session.run(None, {"x": x.numpy()})[0]), result.student(x), atol=1e-4)

    cfg = cfg.model_copy(update={"method": "tucker-only"})
    run_pipeline(small_cnn, small_cnn_spec, cfg, tmp_path / "noise", device="cpu", seed=0)
    q = _int8_report(tmp_path / "noise")
    assert q["calibration"]["source"] == "gaussian" and q["finetune"] == {}
