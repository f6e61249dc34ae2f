"""Data-free INT8: post-training static quantization of an exported ONNX model, calibrated on synthetic samples.

onnxruntime's ``quantize_static`` writes a QDQ model (QuantizeLinear/DequantizeLinear around each quantized
op): weights int8 per output channel, activations uint8 with ranges from calibration. Calibration data are the
job's own synthetic samples (never data). Neither the calibration method (MinMax, Entropy, Percentile) nor the
range equalization inside factorized layers (kegnet.compression.equalization: exact in fp32) is fixed: each
method is tried on the model as it is and on its equalized copy, and the int8 model closest to the teacher on
the job's synthetic exam (the median over its samples of the KL from the teacher) is kept (``best_int8``), in the
job among the candidates that pass its check. The checks are the latency filter's: the int8 model must not run
slower than the fp32 one (timed in turns at batch 1 and 64) nor lose more than ``max_drop`` of agreement with the
teacher on the exam samples the teacher is sure of (``check_part``); otherwise the job keeps fp32 only and says
why.

Why not the whole exam: most of its generator samples sit on the teacher's decision boundaries (class mixes),
where any rounding flips the class. Measured on five teachers over fifteen runs (docs/benchmarks.md, issue 22),
the job's int8 models, −2.00 to +1.25 points from their fp32 model on real data, lost 1-18 points of whole-exam
agreement (the same models calibrated on real data 10-55), so the whole exam refused every int8 model. On the
samples the teacher gives one class 90% or more they lost at most 1.2 points, while Gaussian-noise calibration
lost 2.7-28 points on thirteen of fifteen (LeNet-5's, 9 points lower on real data, among them). It guards
against a broken model; it does not estimate accuracy (MobileNetV3-small's int8 model 2.00 points lower lost
nothing there).

Weights use a 7-bit range (``reduce_range``), onnxruntime's advice for x86 CPUs without VNNI: their u8·s8 dot
products add two products in 16 bits, which saturate when both weights are near +-127 and both activations near
255. The int8 file runs on the user's CPU, not the worker's, so the job cannot know whether it will saturate.
Measured on such a CPU (docs/benchmarks.md, issue 22): a LeNet-5 student's int8 model lost 3.98 points to
saturation with 8-bit weights (onnxruntime's unfused QDQ arithmetic on the same file: -0.15) and none with 7-bit
ones; over ten bench runs 7 bits were better on four and 0.10-1.04 points worse on six.
``compression.quantize_reduce_range: false`` gives the full range. onnxruntime is an optional extra
(``kegnet[onnx]``), imported only when a model is quantized.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kegnet.compression.bias_correction import correct_bias
from kegnet.compression.equalization import equalize
from kegnet.compression.onnx_compact import compact
from kegnet.compression.onnx_session import open_session
from kegnet.compression.rounding import adaround
from kegnet.distill.exam import SURE, Exam, Grade, agreement_on, choose, grade, sure_part
from kegnet.errors import Cancelled
from kegnet.report import Quantization

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
SETTINGS = {"format": "QDQ", "weights": "int8, per channel", "activations": "uint8"}
CALIBRATION_BATCH = 64
# The int8 model should compute what its fp32 model computes: the exam's KL from the teacher measures that on
# every sample, while agreement counts the boundary samples whose class flips (KL's choice was better on real
# data twice in three, docs/benchmarks.md, "the calibration method by KL"). The median over samples, not the
# mean: a few generator samples reach activations that real inputs do not, and the clipped ranges of the Entropy
# and Percentile calibrators put those few far off, which decided the mean against the candidates that were best
# on real data. Among the candidates the int8 check passes (``quantize_job``), the median's choice was 0.16-0.71
# points better on five of fourteen saved jobs, the same on eight and 0.10 worse on one (mean -1.05 -> -0.90
# against fp32; docs/benchmarks.md, sixth session).
CHOOSE_BY = "kl_median"
BATCHES = (1, 64)


def missing_runtime() -> str | None:
    """Why no model can be quantized here (onnxruntime absent), or None."""
    try:
        import onnxruntime  # noqa: F401
        import onnxruntime.quantization  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed (pip install 'kegnet[onnx]')"
    return None


class OnnxModel(nn.Module):
    """An onnxruntime session behind ``nn.Module``'s call, so the exam grades it like a torch student."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        super().__init__()
        self.session = open_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run(None, {self.input_name: x.detach().float().cpu().numpy()})[:1]
        return torch.from_numpy(logits).to(x.device)


def calibration_batch(count: int) -> int:
    """The largest batch up to ``CALIBRATION_BATCH`` that divides ``count`` samples into equal batches:
    onnxruntime's histogram calibrators (Entropy, Percentile) stack every batch's activations into one array and
    fail on a shorter last batch."""
    return max(b for b in range(1, min(CALIBRATION_BATCH, count) + 1) if count % b == 0)


def _calibration_reader(name: str, samples: np.ndarray) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _Batches(CalibrationDataReader):
        """The calibration samples in equal batches (``calibration_batch``) under the model's input name."""

        def __init__(self) -> None:
            batch = calibration_batch(len(samples))
            self._batches: Iterator[np.ndarray] = iter(np.split(samples, range(batch, len(samples), batch)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {name: batch}

    return _Batches()


def prepare(fp32: Path, path: Path) -> None:
    """onnxruntime's pre-processing: shape inference and graph optimization (BatchNorm folded into the convs,
    so that no QDQ pair sits between them)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32), str(path))


def quantize(prepared: Path, path: Path, calibration: torch.Tensor, method: str, reduce_range: bool = True) -> None:
    """Write ``path``: ``prepared`` (see ``prepare``) quantized to INT8, ranges from ``calibration`` by ``method``;
    ``reduce_range``: weights in 7 bits (the module says why)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    name = open_session(prepared, 1).get_inputs()[0].name
    samples = calibration.detach().float().cpu().numpy()
    # Entropy's ranges come in as overrides (below); quantize_static then only needs a calibrator to run.
    method_of = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.MinMax,
                 "percentile": CalibrationMethod.Percentile}
    extra: dict[str, Any] = {}
    if method == "entropy":
        # quantize_static's Entropy keeps onnxruntime's 128 histogram bins, as many as it quantizes to, so its
        # KL search has one candidate, the whole range: the MinMax model byte for byte (onnxruntime issue
        # 9597). Ranges from the entropy calibrator at 512 bins are given to quantize_static as per-tensor
        # overrides instead (2,048, PyTorch's and TensorRT's, made its Python KL search 4x slower).
        extra["TensorQuantOverrides"] = _entropy_ranges(prepared, path.with_suffix(".aug.onnx"), name, samples)
    with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
        quantize_static(str(prepared), str(path), _calibration_reader(name, samples), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=method_of[method],
                        extra_options=extra)


def _entropy_ranges(prepared: Path, augmented: Path, name: str, samples: np.ndarray) -> dict[str, list[dict]]:
    """Every calibrated tensor's ``{rmin, rmax}`` by onnxruntime's entropy (KL) calibrator at 512 bins."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            calibrator = create_calibrator(prepared, None, augmented_model_path=str(augmented),
                                           calibrate_method=CalibrationMethod.Entropy,
                                           extra_options={"num_bins": 512, "num_quantized_bins": 128})
            calibrator.collect_data(_calibration_reader(name, samples))
            ranges = calibrator.compute_data()
    finally:
        augmented.unlink(missing_ok=True)
    return {tensor: [{"rmin": np.float32(r.range_value[0]), "rmax": np.float32(r.range_value[1])}]
            for tensor, r in ranges.data.items()}


def best_method(prepared: Path, work: Path, calibration: torch.Tensor, exam: Exam, threads: int = 1,
                should_cancel: Callable[[], bool] | None = None,
                reduce_range: bool = True) -> tuple[str, dict[str, Grade]]:
    """Quantize with every calibration method into ``work/<method>.onnx``; the method whose model is closest to
    the teacher on ``exam`` (``CHOOSE_BY``), and every method's grade."""
    grades: dict[str, Grade] = {}
    for method in METHODS:
        if should_cancel is not None and should_cancel():
            raise Cancelled("cancelled while quantizing")
        quantize(prepared, work / f"{method}.onnx", calibration, method, reduce_range)
        grades[method] = grade(OnnxModel(work / f"{method}.onnx", threads), exam)
    return choose(grades, by=CHOOSE_BY), grades


@dataclass
class Int8Choice:
    """The int8 model kept among the candidates of ``best_int8``."""

    name: str  # the kept candidate: "minmax", ..., "equalized minmax", ...
    grades: dict[str, Grade]  # every candidate's exam grade
    paths: dict[str, Path]  # every candidate's QDQ model (in the work folder)
    references: dict[str, Path]  # "" and "equalized ": the fp32 models the candidates were quantized from
    equalization: dict[str, Any] | None  # kegnet.compression.equalization's report, where it ran

    @property
    def equalized(self) -> bool:
        return self.name.startswith("equalized ")

    @property
    def method(self) -> str:  # one of METHODS
        return self.name.removeprefix("equalized ")

    @property
    def path(self) -> Path:
        return self.paths[self.name]

    @property
    def reference(self) -> Path:  # the fp32 model the kept one was quantized from (the bias correction's)
        return self.references["equalized " if self.equalized else ""]

    @property
    def grade(self) -> Grade:
        return self.grades[self.name]


def best_int8(prepared: Path, work: Path, calibration: torch.Tensor, exam: Exam, *, threads: int = 1,
              should_cancel: Callable[[], bool] | None = None, reduce_range: bool = True,
              candidates: str = "both") -> Int8Choice:
    """The int8 model closest to the teacher on ``exam`` (``CHOOSE_BY``) among ``prepared`` quantized with every
    calibration method (``candidates`` "plain" or "both") and its range-equalized copy quantized likewise
    ("equalized" or "both"; kegnet.compression.equalization on ``calibration``). Equalization is a candidate,
    not a fixed step: with 7-bit weights it made the Fashion lcnet_050 int8 models up to 5.6 points better on real
    data and moved the other teachers' by -0.9 to +1.9 (docs/benchmarks.md, issue 22), so the exam
    chooses."""
    grades: dict[str, Grade] = {}
    paths: dict[str, Path] = {}
    equalization, sources = None, {}
    if candidates in ("plain", "both"):
        sources[""] = prepared
    if candidates in ("equalized", "both"):
        equalization = equalize(prepared, work / "equalized.onnx", calibration, threads, should_cancel)
        if equalization["pairs"] or candidates == "equalized":  # without pairs it is the plain model again
            sources["equalized "] = work / "equalized.onnx"
    for prefix, source in sources.items():
        folder = work / prefix.strip() if prefix else work
        folder.mkdir(exist_ok=True)
        _, method_grades = best_method(source, folder, calibration, exam, threads, should_cancel, reduce_range)
        grades |= {prefix + m: g for m, g in method_grades.items()}
        paths |= {prefix + m: folder / f"{m}.onnx" for m in method_grades}
    return Int8Choice(choose(grades, by=CHOOSE_BY), grades, paths, sources, equalization)


def time_in_turns(paths: dict[str, Path], input_shape: tuple[int, ...], *, threads: int = 1,
                  batches: tuple[int, ...] = BATCHES, repeats: int = 15, budget_s: float = 2.0,
                  seed: int = 0) -> dict[str, dict[str, float]]:
    """Milliseconds per run of each model at each batch (median and fastest), runs alternating between the
    models so that all see the same machine: ``{name: {"batch1_ms", "batch1_min_ms", ...}}``."""
    sessions = {name: open_session(p, threads) for name, p in paths.items()}
    out: dict[str, dict[str, float]] = {name: {} for name in paths}
    rng = np.random.default_rng(seed)
    for b in batches:
        x = rng.standard_normal((b, *input_shape), dtype=np.float32)
        feeds = {name: {s.get_inputs()[0].name: x} for name, s in sessions.items()}
        for name, s in sessions.items():  # warm-up
            s.run(None, feeds[name])
        times: dict[str, list[float]] = {name: [] for name in sessions}
        start = time.perf_counter()
        while min(len(t) for t in times.values()) < 3 or (
                len(times[next(iter(times))]) < repeats and time.perf_counter() - start < budget_s):
            for name, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, feeds[name])
                times[name].append(time.perf_counter() - t0)
        for name, t in times.items():
            out[name] |= {f"batch{b}_ms": 1e3 * statistics.median(t), f"batch{b}_min_ms": 1e3 * min(t)}
    return out


def check_part(exam: Exam) -> tuple[Exam, str]:
    """The part of ``exam`` that decides whether an int8 model is kept, and its name for the report: the samples
    the teacher is sure of (``kegnet.distill.exam.sure_part``), or the whole exam where too few are (stricter:
    it refuses more good models)."""
    sure = sure_part(exam)
    if sure is None:
        return exam, "whole exam"
    return sure, f"exam samples the teacher gives one class {SURE:.0%} or more"


def _slower(latency: dict[str, dict[str, float]], tolerance: float) -> str | None:
    """How the int8 model ran slower than fp32 at the first batch size where it did (beyond ``tolerance``), or
    None."""
    for b in BATCHES:
        f, i = latency["fp32"][f"batch{b}_min_ms"], latency["int8"][f"batch{b}_min_ms"]
        if i > f * (1 + tolerance):
            return f"it ran slower than the fp32 model at batch {b} in onnxruntime ({i:.3g} ms against {f:.3g} ms)"
    return None


def _verdict(check: dict[str, Any], slower: str | None, keep_slower: bool) -> str | None:
    """Why the int8 model is not kept (too far from the teacher on ``check``, or ``slower`` unless
    ``keep_slower``), or None."""
    if check["drop"] > check["max_drop"]:
        return (f"its agreement with the teacher on the synthetic {check['on']} ({check['samples']}) fell by "
                f"{check['drop']:.4f} ({check['fp32']:.4f} -> {check['int8']:.4f}), more than "
                f"compression.quantize_max_drop {check['max_drop']:g}")
    return None if keep_slower else slower


def quantize_job(fp32: Path, out: Path, calibration: torch.Tensor, source: str, exam: Exam,
                 input_shape: tuple[int, ...], *, max_drop: float, tolerance: float, threads: int = 1,
                 repeats: int = 15, budget_s: float = 2.0, seed: int = 0,
                 should_cancel: Callable[[], bool] | None = None, reduce_range: bool = True,
                 equalize_ranges: bool = True, rounding: str = "nearest",
                 bias_correction: bool = False, keep_slower: bool = False) -> Quantization:
    """The job's INT8 step: ``fp32`` (``student.onnx``) quantized as ``best_int8`` chooses among the candidates
    that lose at most ``max_drop`` of agreement with the teacher on ``check_part(exam)`` (among all where none
    does), checked again, and written to ``out`` only when it is still within ``max_drop`` and not slower; the
    report says why not. The check comes first because the candidate closest to the teacher by the median KL may
    be one the check refuses (Entropy's clipped ranges lose many of the samples the teacher is sure of), and the
    job would then keep no int8 model where another candidate passes (docs/benchmarks.md, sixth session). The
    file is compacted first (kegnet.compression.onnx_compact: the same outputs bit for bit).
    ``equalize_ranges``: the range-equalized copy is a candidate too (kegnet.compression.equalization);
    ``rounding`` "adaptive": the chosen model's weights rounded up or down on ``calibration``
    (kegnet.compression.rounding); ``bias_correction``: then its biases corrected on ``calibration``
    (kegnet.compression.bias_correction). ``keep_slower``: written even where it ran slower than ``fp32`` (the
    report's ``slower`` then says how much)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix=".int8-", dir=out.parent) as tmp:
        work = Path(tmp)
        prepare(fp32, work / "prepared.onnx")
        best = best_int8(work / "prepared.onnx", work, calibration, exam, threads=threads,
                         should_cancel=should_cancel, reduce_range=reduce_range,
                         candidates="both" if equalize_ranges else "plain")
        fp32_model = OnnxModel(fp32, threads)
        part, on = check_part(exam)
        fp32_agreement = agreement_on(fp32_model, part)
        passing = [name for name, path in best.paths.items()
                   if fp32_agreement - agreement_on(OnnxModel(path, threads), part) <= max_drop]
        if passing:
            best = dataclasses.replace(best, name=choose({n: best.grades[n] for n in passing}, by=CHOOSE_BY))
        method, chosen, int8_grade, corrected, rounded = best.method, best.path, best.grade, None, None
        if rounding == "adaptive":
            rounded = adaround(best.reference, chosen, work / "rounded.onnx", calibration,
                               threads=threads, seed=seed, should_cancel=should_cancel)
            chosen = work / "rounded.onnx"
            int8_grade = grade(OnnxModel(chosen, threads), exam)
        if bias_correction:
            corrected = correct_bias(best.reference, chosen, work / "corrected.onnx", calibration, threads,
                                     should_cancel)
            chosen = work / "corrected.onnx"
            int8_grade = grade(OnnxModel(chosen, threads), exam)
        some = calibration[:CALIBRATION_BATCH].detach().float().cpu().numpy()
        compacted = compact(chosen, work / "compact.onnx", some, threads)
        chosen = work / "compact.onnx"
        fp32_grade = grade(fp32_model, exam)
        agree = {"fp32": fp32_agreement, "int8": agreement_on(OnnxModel(chosen, threads), part)}
        check = {"on": on, "samples": len(part.x), **agree, "drop": agree["fp32"] - agree["int8"],
                 "max_drop": max_drop}
        latency = time_in_turns({"fp32": fp32, "int8": chosen}, input_shape, threads=threads, repeats=repeats,
                                budget_s=budget_s, seed=seed)
        slower = _slower(latency, tolerance)
        why_not = _verdict(check, slower, keep_slower)
        sizes = {"fp32": fp32.stat().st_size, "int8": chosen.stat().st_size}
        if why_not is None:
            shutil.move(str(chosen), str(out))
            out.chmod(0o644)
        else:
            log.warning("no %s: %s", out.name, why_not)
    return Quantization(
        kept=why_not is None, file=out.name if why_not is None else None, reason=why_not,
        slower=slower if why_not is None else None, method=method,
        calibration={"source": source, "samples": len(calibration), "method": method,
                     **({"equalization": {**best.equalization, "kept": best.equalized}}
                        if best.equalization is not None else {}),
                     "rounding": {"method": rounding, **(rounded or {})},
                     **({"bias_correction": corrected} if corrected is not None else {}),
                     "methods": {m: _grade_figures(g) for m, g in best.grades.items()},
                     "passing_check": passing},
        exam_agreement={"fp32": fp32_grade.agreement, "int8": int8_grade.agreement,
                        "drop": fp32_grade.agreement - int8_grade.agreement},
        check=check,
        latency_ms=latency, threads=threads, bytes=sizes,
        settings={**SETTINGS, "weight_range": "7-bit (reduce_range)" if reduce_range else "8-bit",
                  "file": ("compacted: short tensor names, no metadata" if compacted["bytes_after"] <
                           compacted["bytes_before"] else "as onnxruntime wrote it"),
                  "runtime": f"onnxruntime {ort.__version__}"})


def _grade_figures(g: Grade) -> dict[str, float]:
    return {"agreement": g.agreement, "balanced": g.balanced, "kl": g.kl, "kl_median": g.kl_median}


__all__ = ["METHODS", "Int8Choice", "OnnxModel", "best_int8", "best_method", "calibration_batch", "check_part",
           "missing_runtime", "prepare", "quantize", "quantize_job", "time_in_turns"]
