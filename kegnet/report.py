"""The run report: ``manifest.json``, typed.

Every job writes one ``RunReport``: a core that every task shares (sizes, agreement with the teacher and what
that agreement measures, speed, stage times, versions, files) and one section for its task (``classify`` or
``sequence``). The pipeline writes it; the worker, the CLI, the bench and the demo read it back with
``RunReport.read``. The JSON on disk is a stable format: ``format`` names it, ``version`` counts breaking
changes (docs/report.md describes every field).

Version history: 1 (no ``version`` field) had one flat layout per task; 2 is this core plus task sections.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kegnet.artifacts import INT8_ONNX, MANIFEST
from kegnet.hashing import sha256_file

REPORT_FORMAT = "kegnet.run-report"
REPORT_VERSION = 2


class _Section(BaseModel):
    # Reading tolerates fields a newer writer added; writing is typed by the models below.
    model_config = ConfigDict(extra="allow")


class Sizes(_Section):
    """A count for the teacher and for the student (parameters, MACs)."""

    teacher: int
    student: int


class Agreement(_Section):
    """How often the student does what the teacher does, on samples the job made itself (never data)."""

    measure: str = Field(description="what is compared, on which samples")
    before_finetune: float | None = Field(None, description="the factorized student before any fine-tuning")
    final: float | None = Field(None, description="the student returned (the step kept by selection)")
    best_step: int | None = None
    lr: float | None = Field(None, description="the learning rate of the kept steps")
    retried: bool = Field(False, description="the first graded step at distill.lr fell below the start (on the "
                                             "exam and on its samples the teacher is sure of), so fine-tuning "
                                             "stopped there and ran once more from the start at lr times "
                                             "distill.retry_lr (the curve's points with an lr)")


class Speed(_Section):
    """The teacher's and the student's speed on the job's device; ``unit`` says what the numbers are."""

    device: str
    unit: str = Field(description="'ms' (milliseconds per forward pass, lower is faster) or 'sequences/s' "
                                  "and 'tokens/s' (greedy decoding, higher is faster)")
    teacher: dict[str, float]
    student: dict[str, float]


class FileInfo(_Section):
    sha256: str
    bytes: int


class Teachers(_Section):
    count: int = 1
    weighting: str = "mean"
    student_from: int = 0
    agreement_with_ensemble: list[float] | None = None  # per teacher, on synthetic samples (several teachers)


class Confidence(_Section):
    """How sure we are without data (kegnet.distill.confidence); other keys give the detail."""

    estimate: float = Field(description="min(agreement, balanced agreement) on the synthetic exam, 0-1")
    level: Literal["high", "medium", "low"]
    warnings: list[str] = Field(default_factory=list)
    agreement: float | None = Field(None, description="the plain exam agreement (reports before 2026-12-05: "
                                                      "absent; it was the estimate)")
    generator_exam: bool | None = Field(None, description="the exam held generator samples; without them the "
                                                          "level is at most medium")
    calibrated: bool | None = Field(None, description="the generators are of a kind the levels were calibrated "
                                                      "on (kegnet.distill.confidence.is_calibrated); if not, the "
                                                      "level is at most medium (reports before 2026-12-05: absent)")


class Evaluation(_Section):
    """Accuracy on the user's own labelled set (kegnet.evaluation): reported only."""

    samples: int
    teacher_accuracy: float
    student_accuracy: float


class Quantization(_Section):
    """The INT8 model of ``compression.quantize: int8`` (kegnet.compression.quantize): how it was calibrated,
    how it compares with the fp32 ONNX model it came from, and whether the job kept it."""

    kept: bool = Field(description="student.int8.onnx was written (agreement within the bound, and not slower "
                                   "unless compression.quantize_keep_slower)")
    file: str | None = Field(None, description="'student.int8.onnx' when kept")
    reason: str | None = Field(None, description="why it was not kept (the job then keeps fp32 only)")
    slower: str | None = Field(None, description="kept with compression.quantize_keep_slower although it ran "
                               "slower than the fp32 model: at which batch size and both timings")
    method: str | None = Field(None, description="the calibration method kept: minmax, entropy or percentile")
    calibration: dict[str, Any] = Field(default_factory=dict, description="source (a sample recipe or "
                                        "'gaussian'; never data), samples, method, and every method's exam grade")
    exam_agreement: dict[str, float] = Field(default_factory=dict, description="fp32, int8, drop: top-class "
                                             "agreement with the teacher on the whole synthetic exam")
    check: dict[str, Any] = Field(default_factory=dict, description="what decided whether the int8 model is kept: "
                                  "on (the exam samples the teacher is sure of, or the whole exam), samples, fp32, "
                                  "int8, drop, max_drop")
    latency_ms: dict[str, dict[str, float]] = Field(default_factory=dict, description="fp32 and int8 in "
                                                    "onnxruntime on the CPU, timed in turns: batch1_ms, "
                                                    "batch1_min_ms, batch64_ms, batch64_min_ms")
    threads: int = Field(1, description="onnxruntime's intra-op threads while timing")
    bytes: dict[str, int] = Field(default_factory=dict, description="fp32 and int8 file sizes")
    settings: dict[str, str] = Field(default_factory=dict, description="format, weights, activations, runtime")
    finetune: dict[str, Any] = Field(default_factory=dict, description="with compression.quantize_finetune_steps: "
                                     "steps and seconds of the fake-quantized fine-tuning of the copy quantized "
                                     "(fp32 figures above are that copy's)")

    def line(self) -> str:
        if not self.kept:
            return f"no int8 model: {self.reason}"
        lat, agree, size = self.latency_ms, self.exam_agreement, self.bytes
        equalized = "range-equalized, " if (self.calibration.get("equalization") or {}).get("kept") else ""
        return (f"int8 model ({equalized}{self.method} calibration on {self.calibration.get('samples')} "
                f"{self.calibration.get('source')} samples): {size['fp32'] / size['int8']:.2f}x smaller, batch 1 / 64 "
                f"{lat['int8']['batch1_ms']:.3g} / {lat['int8']['batch64_ms']:.3g} ms against "
                f"{lat['fp32']['batch1_ms']:.3g} / {lat['fp32']['batch64_ms']:.3g} ms (fp32), exam agreement "
                f"{agree['int8']:.4f} against {agree['fp32']:.4f}"
                + (f" ({self.check['int8']:.4f} against {self.check['fp32']:.4f} on the {self.check['on']})"
                   if self.check.get("on", "whole exam") != "whole exam" else ""))


class ClassifyReport(_Section):
    """A classifier job's own section."""

    plan: dict[str, Any]
    macs: Sizes
    layer_latency: dict[str, dict[str, float]] = Field(default_factory=dict)
    teachers: Teachers = Field(default_factory=Teachers)
    recipe: str | None = None
    confidence: Confidence | None = None
    evaluation: Evaluation | None = None
    generator_curve: list[dict[str, float]] = Field(default_factory=list)
    distill_curve: list[dict[str, Any]] = Field(default_factory=list)
    # compression.fit = outputs: {"method", "samples", "recipe", "seconds", "layers": {name: {"before", "after"}
    # relative output errors on the fit samples, or "skipped"}}; auto adds "exam" ({"weights", "outputs"}: each
    # start's exam estimate) and "chosen" (with only "weights" and a "why" where no refit was made); with
    # fine-tuning, "feature_weight" (the hints that followed); or {"method": "weights", "why"}.
    fit: dict[str, Any] | None = None
    onnx_skipped: str | None = None
    onnx_check: dict[str, Any] | None = None
    program_skipped: str | None = None
    quantization: Quantization | None = Field(None, description="compression.quantize int8 only")

    def summary(self) -> dict[str, Any]:
        c, e = self.confidence, self.evaluation
        return {
            "teachers": self.teachers.count, "recipe": self.recipe,
            # Agreement with the teacher on a synthetic exam (no data): an estimate, not an accuracy.
            "confidence_estimate": c.estimate if c else None, "confidence_level": c.level if c else None,
            "confidence_warnings": c.warnings if c else None,
            # Only with a user-supplied labelled set: measured on it, reported only.
            "eval_samples": e.samples if e else None, "eval_teacher_accuracy": e.teacher_accuracy if e else None,
            "eval_student_accuracy": e.student_accuracy if e else None,
            "int8_kept": self.quantization.kept if self.quantization else None,
        }

    def lines(self) -> list[str]:
        lines = [f"MACs {self.macs.teacher:,} -> {self.macs.student:,}; {len(self.plan['layers'])} layers "
                 f"factorized, {len(self.plan['skipped'])} left as they were (manifest.json says why)"]
        t = self.teachers
        if t.count > 1:
            lines.append(f"{t.count} teachers, {t.weighting} weighting; student compressed from teacher "
                         f"{t.student_from}")
        if self.recipe:
            lines.append(f"sample recipe kept: {self.recipe}")
        if self.confidence:
            lines.append(f"confidence estimate: {self.confidence.estimate:.4f} ({self.confidence.level}; the lower "
                         "of plain and balanced agreement with the teacher on a synthetic exam, not an accuracy)")
            lines += [f"warning: {w}" for w in self.confidence.warnings]
        if self.evaluation:
            ev = self.evaluation
            lines.append(f"evaluation accuracy on your {ev.samples} labelled samples: teacher "
                         f"{ev.teacher_accuracy:.4f}, student {ev.student_accuracy:.4f} (reported only, never "
                         "used for training or selection)")
        if self.quantization:
            lines.append(self.quantization.line())
        return lines


    def usage(self, out: Path, spec: dict[str, Any], files: dict[str, FileInfo]) -> str:
        """Three lines that load the student and predict, for the files this run wrote."""
        shape = ", ".join(str(d) for d in spec["input_shape"])
        if "student.pt2" in files:
            load = f'import torch; student = torch.export.load("{out / "student.pt2"}").module()'
            predict = "classes = student(x).argmax(1)"
        elif "student.onnx" in files:
            load = f'import onnxruntime, numpy; student = onnxruntime.InferenceSession("{out / "student.onnx"}")'
            predict = 'classes = student.run(None, {"x": x.numpy()})[0].argmax(1)'
        else:
            load = f'from kegnet import load_student; student = load_student("{out}")'
            predict = "classes = student(x).argmax(1)"
        int8 = ""
        if INT8_ONNX in files:
            int8 = (f'\n  # or the int8 model: student = onnxruntime.InferenceSession("{out / INT8_ONNX}"); '
                    'classes = student.run(None, {"x": x.numpy()})[0].argmax(1)')
        return (f"  {load}\n  x = ...  # a float32 tensor of shape (N, {shape}), preprocessed exactly as for the "
                f"teacher\n  {predict}{int8}")


class SequenceReport(_Section):
    """A sequence job's own section."""

    compression: dict[str, Any]
    generation: dict[str, Any] = Field(default_factory=dict)
    exact_agreement: Agreement = Field(description="greedy completions identical to the teacher's")
    distill: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        return {"exact_agreement": self.exact_agreement.final,
                "exact_agreement_before_finetune": self.exact_agreement.before_finetune}

    def lines(self) -> list[str]:
        exact = self.exact_agreement
        if exact.final is None:
            return []
        before = "" if exact.before_finetune is None else f" (SVD only: {exact.before_finetune:.2%})"
        return [f"greedy completions identical to the teacher's: {exact.final:.2%}{before}"]

    def usage(self, out: Path, spec: dict[str, Any], files: dict[str, FileInfo]) -> str:
        load = (f'import torch; student = torch.export.load("{out / "student.pt2"}").module()' if "student.pt2" in files
                else f'from kegnet import load_student; student = load_student("{out}")')
        return f"  {load}\n  logits = student(tokens)  # tokens (B, T) int64 -> next-token logits (B, T, V)"


class RunReport(BaseModel):
    """``manifest.json``: the shared core, then the task's section (the other is None)."""

    model_config = ConfigDict(extra="allow")

    format: Literal["kegnet.run-report"] = REPORT_FORMAT
    version: int = REPORT_VERSION
    task: Literal["classify", "sequence"]
    spec: dict[str, Any]
    architecture: dict[str, Any]
    config: dict[str, Any]
    seed: int
    device: str
    parameters: Sizes
    compression_ratio: float
    agreement: Agreement | None = Field(None, description="None when the job made no samples to compare on")
    speed: Speed
    timings_s: dict[str, float] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list, description="what the user should know about the student "
                                                                  "(slower than the teacher, collapsed ranks)")
    versions: dict[str, str] = Field(default_factory=dict)
    files: dict[str, FileInfo] = Field(default_factory=dict)
    classify: ClassifyReport | None = None
    sequence: SequenceReport | None = None

    @property
    def section(self) -> ClassifyReport | SequenceReport:
        """The task's own section."""
        section = getattr(self, self.task)
        assert section is not None, f"a {self.task} report without its section"
        return section

    def summary(self) -> dict[str, Any]:
        """The headline figures (a job's ``metrics`` in the API), None values left out."""
        out = {
            "compression_ratio": self.compression_ratio,
            "teacher_parameters": self.parameters.teacher,
            "student_parameters": self.parameters.student,
            "synthetic_agreement": self.agreement.final if self.agreement else None,
            "synthetic_agreement_before_finetune": self.agreement.before_finetune if self.agreement else None,
            "agreement_measure": self.agreement.measure if self.agreement else None,
            "seconds": sum(self.timings_s.values()),
            "teacher_speed": self.speed.teacher,
            "student_speed": self.speed.student,
            "speed_unit": self.speed.unit,
            "architecture_source": self.architecture.get("source"),
            "warnings": self.warnings or None,
            **self.section.summary(),
        }
        if self.speed.unit == "ms":  # the names the API has always used for classifiers
            out["teacher_latency_ms"], out["student_latency_ms"] = self.speed.teacher, self.speed.student
        return {k: v for k, v in out.items() if v is not None}

    def lines(self) -> list[str]:
        """What a person reads at the end of a run (the CLI prints these)."""
        p, speed = self.parameters, self.speed
        lines = [f"parameters {p.teacher:,} -> {p.student:,} ({self.compression_ratio:.2f}x)"]
        if speed.teacher:
            batches = sorted({k.split("_")[0] for k in speed.teacher})
            keys = [next(k for k in speed.teacher if k.startswith(b + "_")) for b in batches]
            lines.append(f"speed on {speed.device} ({speed.unit}, {' / '.join(batches)}): teacher "
                         f"{' / '.join(f'{speed.teacher[k]:.3g}' for k in keys)}, student "
                         f"{' / '.join(f'{speed.student[k]:.3g}' for k in keys)}")
        if self.agreement and self.agreement.final is not None:
            a = self.agreement
            before = "" if a.before_finetune is None else f" (before fine-tuning: {a.before_finetune:.4f})"
            lines.append(f"agreement with the teacher: {a.final:.4f}{before}, {a.measure}")
        lines += self.section.lines()
        lines += [f"warning: {w}" for w in self.warnings]
        lines.append(f"wrote {', '.join(sorted(self.files))} and {MANIFEST}")
        return lines

    def usage(self, out: Path) -> str:
        """A few lines of Python that load the student from ``out`` and run it."""
        return self.section.usage(out, self.spec, self.files)

    def write(self, out_dir: Path) -> None:
        """Record the sha256 and size of every file in ``out_dir`` and write ``manifest.json`` atomically."""
        self.files = {
            p.name: FileInfo(sha256=sha256_file(p), bytes=p.stat().st_size)
            for p in sorted(out_dir.iterdir()) if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
        }
        tmp = out_dir / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(self.model_dump(mode="json", exclude_none=False), indent=2))
        tmp.replace(out_dir / MANIFEST)

    @classmethod
    def read(cls, path: str | Path) -> RunReport:
        """Read ``manifest.json`` (or a run directory holding it). Raises ``ValueError`` for another format or
        a newer version than this package reads."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST
        data = json.loads(path.read_text())
        if data.get("format") != REPORT_FORMAT or not isinstance(data.get("version"), int):
            raise ValueError(f"{path} is not a kegnet run report of version {REPORT_VERSION} (an older run's "
                             "manifest.json has no 'version'; rerun the job with this package)")
        if data["version"] > REPORT_VERSION:
            raise ValueError(f"{path} is a version {data['version']} report; this package reads up to "
                             f"{REPORT_VERSION}: upgrade kegnet")
        return cls.model_validate(data)
