"""kegnet.report.RunReport: manifest.json written by a run reads back typed and equal; old and foreign files are
refused; the headline figures, the CLI lines and the usage snippet say what they should."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kegnet import run_pipeline
from kegnet.artifacts import MANIFEST
from kegnet.hashing import sha256_file
from kegnet.report import (
    REPORT_FORMAT,
    REPORT_VERSION,
    Agreement,
    ClassifyReport,
    FileInfo,
    Quantization,
    RunReport,
    SequenceReport,
    Sizes,
    Speed,
)
from tests.conftest import tiny_config

# The keys the API has always given a classifier job's metrics (service: a job's ``metrics``).
API_KEYS = {"compression_ratio", "teacher_parameters", "student_parameters", "synthetic_agreement",
            "synthetic_agreement_before_finetune", "agreement_measure", "seconds", "teacher_latency_ms",
            "student_latency_ms", "teachers", "recipe", "confidence_estimate", "confidence_level",
            "confidence_warnings", "architecture_source"}


def _strict_json(path: Path) -> dict:
    """The file parsed as strict JSON: NaN or Infinity (which json.dumps writes by default) are refused."""
    def refuse(name: str) -> None:
        raise AssertionError(f"{path.name} holds {name}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_tucker_only_report_reads_back_equal(tmp_path: Path, small_cnn, small_cnn_spec) -> None:
    result = run_pipeline(small_cnn, small_cnn_spec, tiny_config("tucker-only"), tmp_path, device="cpu", seed=0)
    report = result.report
    assert RunReport.read(tmp_path) == report == RunReport.read(tmp_path / MANIFEST)
    data = _strict_json(tmp_path / MANIFEST)
    assert (data["format"], data["version"]) == (REPORT_FORMAT, REPORT_VERSION) == ("kegnet.run-report", 2)
    assert data == report.model_dump(mode="json")
    assert data["task"] == "classify" and data["sequence"] is None and data["agreement"] is None  # nothing sampled
    assert report.section is report.classify and report.classify.plan["layers"]
    # Every file of the run directory is listed with its hash and size; the manifest itself is not.
    assert set(report.files) == {p.name for p in tmp_path.iterdir() if p.name != MANIFEST}
    for name, info in report.files.items():
        assert info.sha256 == sha256_file(tmp_path / name) and info.bytes == (tmp_path / name).stat().st_size
    assert set(report.timings_s) == {"load", "plan", "generators", "decompose", "finetune", "export"}
    assert {"kegnet", "torch", "python"} <= set(report.versions)


def test_a_fine_tuned_run_reads_back_and_summarizes(tmp_path: Path, small_cnn, small_cnn_spec) -> None:
    result = run_pipeline(small_cnn, small_cnn_spec, tiny_config("gaussian"), tmp_path, device="cpu", seed=0)
    report = result.report
    back = RunReport.read(tmp_path)
    # On disk as in memory, as JSON (the first distillation step's loss is NaN in memory, null on disk).
    assert back.model_dump(mode="json") == report.model_dump(mode="json") == _strict_json(tmp_path / MANIFEST)
    assert back.classify.recipe == "gaussian" and back.classify.confidence.level in ("high", "medium", "low")
    assert back.agreement is not None and 0.0 <= back.agreement.final <= 1.0 and back.agreement.measure

    summary = back.summary()
    assert set(summary) >= API_KEYS - {"confidence_warnings"}
    assert summary["compression_ratio"] == back.compression_ratio == pytest.approx(
        back.parameters.teacher / back.parameters.student)
    assert (summary["teacher_parameters"], summary["student_parameters"]) == (back.parameters.teacher,
                                                                              back.parameters.student)
    assert summary["synthetic_agreement"] == back.agreement.final
    assert summary["confidence_level"] == back.classify.confidence.level
    assert summary["teacher_latency_ms"] == summary["teacher_speed"] == back.speed.teacher
    assert summary["speed_unit"] == "ms" and summary["recipe"] == "gaussian" and summary["teachers"] == 1
    assert None not in summary.values()  # what is not known is left out
    json.dumps(summary)  # the API returns it as JSON

    lines = back.lines()
    p = back.parameters
    assert lines[0] == f"parameters {p.teacher:,} -> {p.student:,} ({back.compression_ratio:.2f}x)"
    assert lines[1].startswith("speed on cpu (ms, batch1 / batch64): teacher ")
    assert any(line.startswith(f"agreement with the teacher: {back.agreement.final:.4f}") for line in lines)
    assert "sample recipe kept: gaussian" in lines
    assert lines[-1] == f"wrote {', '.join(sorted(back.files))} and manifest.json"
    usage = back.usage(tmp_path)
    assert f'torch.export.load("{tmp_path / "student.pt2"}")' in usage and "classes = student(x).argmax(1)" in usage


def test_an_old_or_foreign_manifest_is_refused(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    # Version 1: no 'format' or 'version', classifier keys at the top level.
    (old / MANIFEST).write_text(json.dumps({"spec": {"arch": "mlp"}, "compression_ratio": 2.0,
                                            "synthetic_agreement": {"best": 0.9}, "latency": {}}))
    with pytest.raises(ValueError, match=r"not a kegnet run report of version 2 \(an older run's manifest.json has "
                                         r"no 'version'; rerun the job"):
        RunReport.read(old)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something-else", "version": 2}))
    with pytest.raises(ValueError, match="is not a kegnet run report"):
        RunReport.read(other)
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({"format": REPORT_FORMAT, "version": REPORT_VERSION + 1}))
    with pytest.raises(ValueError, match=f"is a version {REPORT_VERSION + 1} report; this package reads up to "
                                         f"{REPORT_VERSION}: upgrade kegnet"):
        RunReport.read(newer)


def _sequence_report() -> RunReport:
    speed = {"batch1_tokens_per_s": 100.0, "batch1_sequences_per_s": 5.0}
    return RunReport(
        task="sequence", spec={"arch": "transformer", "task": "sequence"}, architecture={"source": "kegnet"},
        config={"task": "sequence"}, seed=0, device="cpu", parameters=Sizes(teacher=300, student=100),
        compression_ratio=3.0, agreement=Agreement(measure="tokens", before_finetune=0.5, final=0.75, best_step=10),
        speed=Speed(device="cpu", unit="sequences/s and tokens/s, greedy", teacher=speed,
                    student={k: 2 * v for k, v in speed.items()}),
        sequence=SequenceReport(compression={"ratio": 3.0},
                                exact_agreement=Agreement(measure="exact", before_finetune=0.25, final=0.5)))


def test_a_sequence_report_has_its_own_headline_and_no_latency_keys(tmp_path: Path) -> None:
    report = _sequence_report()
    summary = report.summary()
    assert summary["synthetic_agreement"] == 0.75 and summary["synthetic_agreement_before_finetune"] == 0.5
    assert summary["exact_agreement"] == 0.5 and summary["exact_agreement_before_finetune"] == 0.25
    assert summary["student_speed"]["batch1_tokens_per_s"] == 200.0
    assert "teacher_latency_ms" not in summary and "confidence_level" not in summary  # not milliseconds
    assert "greedy completions identical to the teacher's: 50.00% (SVD only: 25.00%)" in report.lines()
    assert "logits = student(tokens)" in report.usage(tmp_path)
    tmp_path.joinpath("student.safetensors").write_bytes(b"x")
    report.write(tmp_path)
    assert set(report.files) == {"student.safetensors"} and report.files["student.safetensors"].bytes == 1
    assert RunReport.read(tmp_path) == report and report.section is report.sequence


def test_the_int8_section_reads_back_and_tells_the_user(tmp_path: Path) -> None:
    latency = {"fp32": {"batch1_ms": 2.0, "batch64_ms": 40.0}, "int8": {"batch1_ms": 1.0, "batch64_ms": 10.0}}
    kept = Quantization(kept=True, file="student.int8.onnx", method="entropy",
                        calibration={"source": "kegnet/simplex", "samples": 512, "method": "entropy"},
                        exam_agreement={"fp32": 0.99, "int8": 0.985, "drop": 0.005, "max_drop": 0.01},
                        latency_ms=latency, bytes={"fp32": 4000, "int8": 1000})
    section = ClassifyReport(plan={"layers": [], "skipped": {}}, macs=Sizes(teacher=1, student=1), quantization=kept)
    assert ("int8 model (entropy calibration on 512 kegnet/simplex samples): 4.00x smaller, batch 1 / 64 1 / 10 ms "
            "against 2 / 40 ms (fp32), exam agreement 0.9850 against 0.9900") in section.lines()
    assert section.summary()["int8_kept"] is True
    files = {n: {"sha256": "0" * 64, "bytes": 1} for n in ("student.onnx", "student.int8.onnx")}
    usage = section.usage(tmp_path, {"input_shape": [1, 8, 8]}, {n: FileInfo(**f) for n, f in files.items()})
    assert f'InferenceSession("{tmp_path / "student.int8.onnx"}")' in usage
    refused = Quantization(kept=False, reason="it ran slower than the fp32 model at batch 1")
    assert ClassifyReport.model_validate({**section.model_dump(), "quantization": refused.model_dump()}).lines()[-1] \
        == "no int8 model: it ran slower than the fp32 model at batch 1"
