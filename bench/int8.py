"""``python -m bench.int8 TEACHER [--seed S] [--threads N] [--out FILE]``: data-free INT8 on real test data (issue 22).

One job with ``compression.quantize: int8`` (the product's path: the student, or the teacher where no layer is
worth factorizing), then the job's ``student.onnx`` quantized three ways, each with its calibration method
chosen on the job's synthetic exam (kegnet.compression.quantize.best_int8):

- ``int8``: the job's own synthetic samples (the kept recipe's mix, the same draw as the job's);
- ``int8-gaussian``: standard Gaussian noise;
- ``int8-real``: the real training split (the ceiling: bench only, never the product);
- with ``--bias-correction``, each int8 model again with its biases corrected on its own calibration samples
  (``kegnet.compression.bias_correction``), suffixed ``-bc``: the same model, paired;
- with ``--adaptive-rounding``, each int8 model again with its weights rounded up or down on its own calibration
  samples (``kegnet.compression.rounding``, the job's ``compression.quantize_rounding: adaptive``), suffixed
  ``-ar``: the same model, paired;
- with ``--both-ranges``, each again with the other weight range (``compression.quantize_reduce_range``
  flipped: 7-bit weights where the config has 8), suffixed ``-7bit`` or ``-8bit``: the same student, paired;
- with ``--both-equalization``, each again with the range equalization inside factorized layers
  (kegnet.compression.equalization, on the row's own calibration samples; by default on every row but the
  Gaussian one, as in the job) flipped, suffixed ``-noeq`` or ``-eq``: the same student, paired.

Rows report real test accuracy (onnxruntime), agreement with the teacher on the synthetic exam (the whole exam,
which chooses the method as in the job, its generator samples alone, and the samples the teacher gives one class
90% or more: ``kegnet.distill.exam.confident_part``), file bytes and
milliseconds at batch 1 and 64, every model timed in turns in one onnxruntime process (``--threads`` intra-op
threads). Real data appears only here.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.datasets import load_image_split, shared_dir
from bench.scenarios import LENET
from bench.suite.teachers import suite_teacher
from kegnet import ClassifierConfig, ModelSpec, export, load_teacher, run_pipeline
from kegnet.compression import quantize
from kegnet.compression.bias_correction import correct_bias
from kegnet.compression.onnx_compact import compact
from kegnet.compression.rounding import adaround
from kegnet.distill.exam import Grade, build_exam, confident_part, exam_sources, generator_part, grade
from kegnet.generation import KegNetSampler
from kegnet.tasks.classify import calibration_set

log = logging.getLogger("bench.int8")

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # train x, y, test x, y


@dataclass
class Teacher:
    build: Callable[[], tuple[nn.Module, ModelSpec, Split]]
    config: dict[str, Any]  # ClassifierConfig sections on top of "fast"
    about: str


def _mnist_lenet() -> tuple[nn.Module, ModelSpec, Split]:
    teacher = load_teacher(shared_dir() / "teachers" / "kegnet-mnist-lenet5.pth.tar", LENET)
    return teacher, LENET, (*load_image_split("mnist", "train"), *load_image_split("mnist", "test"))


def _suite(name: str) -> Callable[[], tuple[nn.Module, ModelSpec, Split]]:
    def build() -> tuple[nn.Module, ModelSpec, Split]:
        path, spec, split, _ = suite_teacher(name)
        return load_teacher(path, spec), spec, split

    return build


# The CPU budget of bench/scenarios.py's library teachers: 2 generators x 200 steps, 600 student steps.
_LIBRARY_BUDGET: dict[str, Any] = {
    "generator": {"num_generators": 2, "steps": 200, "batch_size": 64},
    "distill": {"steps": 600, "batch_size": 64, "eval_every": 100, "holdout_samples": 512},
}
TEACHERS: dict[str, Teacher] = {
    # keep_slower, as in bench/scenarios.py's paper rows: 4.10x whatever the layers' speed on this CPU.
    "mnist-lenet5": Teacher(_mnist_lenet, {"compression": {"layers": ["conv2", "conv3"], "rank_method": "evbmf",
                                                           "keep_slower": True}},
                            "the paper's LeNet-5 MNIST teacher at 4.10x (EVBMF Tucker-2 on conv2+conv3), fast preset"),
    "fashion-lcnet": Teacher(_suite("fashion-lcnet"),
                             {**_LIBRARY_BUDGET, "compression": {"rank_method": "ratio", "target_ratio": 2.5,
                                                                 "n_iter_max": 1}},
                             "timm lcnet_050 trained on Fashion-MNIST (bench/suite); ranks for 2.5x, latency "
                             "filter on; the library CPU budget"),
    "mnist-lcnet": Teacher(_suite("mnist-lcnet"),
                           {**_LIBRARY_BUDGET, "compression": {"rank_method": "ratio", "target_ratio": 2.5}},
                           "timm lcnet_050 trained on MNIST (bench/suite); the default plan (global allocation) "
                           "for 2.5x, latency filter on; the library CPU budget"),
    **{name: Teacher(_suite(name), {**_LIBRARY_BUDGET, "compression": {"rank_method": "ratio", "target_ratio": 2.5,
                                                                        "n_iter_max": 1}},
                     f"{arch} trained on Fashion-MNIST (bench/suite); the default plan for 2.5x, latency filter on; "
                     "the library CPU budget")
       for name, arch in (("fashion-resnet18", "torchvision ResNet-18"),
                          ("fashion-mobilenetv3", "timm mobilenetv3_small_100"))},
}
SAMPLES = 512  # calibration samples of every row (the job's default)


def _accuracy(path: Path, x: torch.Tensor, y: torch.Tensor, threads: int) -> float:
    model = quantize.OnnxModel(path, threads)
    hits = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(1000), y.split(1000), strict=True))
    return hits / len(y)


def run(name: str, seed: int, threads: int, work: Path, repeats: int, budget_s: float,
        extra: dict[str, Any], job: bool = True, both_ranges: bool = False,
        bias_correction: bool = False, both_equalization: bool = False,
        adaptive_rounding: bool = False) -> dict[str, Any]:
    teacher, spec, (x_train, _, x_test, y_test) = TEACHERS[name].build()
    teacher = teacher.eval()
    sections = {k: dict(v) for k, v in TEACHERS[name].config.items()}
    for key, value in extra.items():
        sections[key] = {**sections.get(key, {}), **value}
    sections["compression"] = {**sections.get("compression", {}), "quantize": "int8", "quantize_samples": SAMPLES}
    cfg = ClassifierConfig.from_preset("fast", **sections)
    cpu = torch.device("cpu")
    paths = {"teacher": work / "teacher.onnx", "fp32": work / "job" / "student.onnx"}
    export.export_onnx(teacher, spec.input_shape, paths["teacher"])
    kegnet, info = None, {}
    if job:
        t0 = time.perf_counter()
        result = run_pipeline(teacher, spec, cfg, work / "job", device="cpu", seed=seed)
        report = result.report
        info = {"job_seconds": time.perf_counter() - t0, "compression_ratio": report.compression_ratio,
                "recipe": report.classify.recipe, "warnings": report.warnings,
                "job_int8": report.classify.quantization.model_dump(mode="json")}
        kegnet = (KegNetSampler(result.generators, spec.num_classes, cfg.generator.noise_dim, cpu)
                  if result.generators else None)
    else:  # --no-job: the teacher's own ONNX file, quantized with noise and real samples only
        paths = {"fp32": paths["teacher"]}
    recipes = cfg.candidate_recipes(True, spec.num_classes)
    recipe = next((r for r in recipes if r.name == info.get("recipe")), recipes[0])
    # The job's exam, drawn again with its seed, grades every row's calibration methods.
    exam = build_exam(teacher, exam_sources(kegnet, spec.input_shape, cpu), cfg.distill.holdout_samples,
                      seed + 7919, cpu)
    rng = torch.Generator().manual_seed(seed)
    calibrations = {
        **({"int8": calibration_set(recipe, kegnet, spec.input_shape, SAMPLES, seed, cpu)} if job else {}),
        "int8-gaussian": (torch.randn(SAMPLES, *spec.input_shape, generator=rng), "gaussian"),
        "int8-real": (x_train[torch.randperm(len(x_train), generator=rng)[:SAMPLES]], "real training split"),
    }
    part = generator_part(exam)  # its generator samples alone: a second column (the job grades the whole exam)
    sure = confident_part(exam)  # the samples the teacher gives one class 90%+: a third column
    quantize.prepare(paths["fp32"], work / "prepared.onnx")
    rows: dict[str, dict[str, Any]] = {name: {"calibration": "-"} for name in paths}
    whole: dict[str, Grade] = {}  # each model's grade on the whole exam
    reduce, eq = cfg.compression.quantize_reduce_range, cfg.compression.quantize_equalize
    ranges = {"": reduce, **({"-8bit" if reduce else "-7bit": not reduce} if both_ranges else {})}
    for (row, (x_cal, source)), (r_suffix, reduce_range), flipped in itertools.product(
            calibrations.items(), ranges.items(), (False, True) if both_equalization else (False,)):
        # As in the job: the plain and the equalized model both candidates, never equalized on noise.
        candidates = "both" if eq and source != "gaussian" else "plain"
        if flipped:
            candidates, r_suffix = ("plain", r_suffix + "-noeq") if candidates == "both" else \
                ("equalized", r_suffix + "-eq")
        row += r_suffix
        (work / row).mkdir()
        best = quantize.best_int8(work / "prepared.onnx", work / row, x_cal, exam, threads=threads,
                                  reduce_range=reduce_range, candidates=candidates)
        grades = best.grades
        paths[row], whole[row] = best.path, best.grade
        # Every candidate's real accuracy too: how much the exam's choice costs against the best of them.
        rows[row] = {"calibration": source, "method": best.name,
                     "reduce_range": reduce_range, "equalization": best.equalization,
                     "methods": {m: g.agreement for m, g in grades.items()},
                     "methods_grades": {m: {"agreement": g.agreement, "balanced": g.balanced, "kl": g.kl,
                                            "kl_median": g.kl_median}
                                        for m, g in grades.items()},
                     "methods_test_accuracy": {m: _accuracy(p, x_test, y_test, threads) for m, p in best.paths.items()}}
        if bias_correction:  # the same model, its biases corrected on the same samples: a paired row
            corrected = work / row / "bias-corrected.onnx"
            done = correct_bias(best.reference, paths[row], corrected, x_cal, threads)
            paths[row + "-bc"] = corrected
            whole[row + "-bc"] = grade(quantize.OnnxModel(corrected, threads), exam)
            rows[row + "-bc"] = {**rows[row], "method": f"{rows[row]['method']} + bias correction",
                                 "bias_correction": done}
        if adaptive_rounding:  # the same model, its weights re-rounded on the same samples: a paired row
            rounded = work / row / "rounded.onnx"
            t0 = time.perf_counter()
            done = adaround(best.reference, paths[row], rounded, x_cal, threads=threads, seed=seed)
            paths[row + "-ar"] = rounded
            whole[row + "-ar"] = grade(quantize.OnnxModel(rounded, threads), exam)
            rows[row + "-ar"] = {**rows[row], "method": f"{rows[row]['method']} + adaptive rounding",
                                 "rounding": {**done, "seconds": time.perf_counter() - t0}}
    whole["fp32"] = grade(quantize.OnnxModel(paths["fp32"], threads), exam)
    for row in [r for r in paths if r not in ("fp32", "teacher")]:  # as the job writes student.int8.onnx
        compacted = paths[row].with_name(paths[row].stem + ".compact.onnx")
        compact(paths[row], compacted, exam.x[:64].numpy(), threads)
        paths[row] = compacted
    for row, path in paths.items():
        rows[row] |= {"bytes": path.stat().st_size, "test_accuracy": _accuracy(path, x_test, y_test, threads)}
        if row != "teacher":
            model = quantize.OnnxModel(path, threads)
            rows[row] |= {"exam_agreement": whole[row].agreement, "per_source": whole[row].per_source,
                          "generator_exam_agreement": grade(model, part).agreement,
                          "confident_exam_agreement": grade(model, sure).agreement}
    latency = quantize.time_in_turns(paths, spec.input_shape, threads=threads, repeats=repeats, budget_s=budget_s,
                                     seed=seed)
    for row in rows:
        rows[row] |= latency[row]
    return {"teacher": name, "about": TEACHERS[name].about, "seed": seed, **info, "rows": rows,
            "exam": {"samples": len(exam.x), "confident": len(sure.x), "confident_sources": sure.sources}}


def job_choice(result: dict[str, Any]) -> str | None:
    """What the job itself kept: its check, then the median KL, among the candidates of the bench's ``int8`` row
    (the same student and calibration samples), with that candidate's real accuracy. The row's own method is
    chosen without the check, so the two can differ (docs/benchmarks.md, ninth session). None without a job."""
    q, rows = result.get("job_int8"), result["rows"]
    if not q or not q.get("method") or "int8" not in rows:
        return None
    equalized = (q.get("calibration", {}).get("equalization") or {}).get("kept")
    name = f"equalized {q['method']}" if equalized else q["method"]
    accuracy = rows["int8"].get("methods_test_accuracy", {}).get(name)
    fp32 = rows["fp32"]["test_accuracy"]
    figure = (f"{100 * accuracy:.2f} % ({100 * (accuracy - fp32):+.2f} against fp32)" if accuracy is not None
              else "accuracy not measured")
    kept = "kept student.int8.onnx" if q["kept"] else f"kept no int8 file ({q['reason']})"
    return f"the job's int8 choice: {name}, {figure}; {kept}"


def table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    fp32 = rows["fp32"]
    lines = ["| row | calibration | method | test acc. % | test acc. % of each candidate: minmax / entropy / "
             "percentile (plain, then equalized) | "
             "exam agreement %: whole / generator samples / confident samples | bytes | "
             "smaller than student.onnx | batch 1 ms | batch 64 ms | speed-up 1 / 64 |", "|---" * 11 + "|"]
    for name, r in rows.items():
        exam = " / ".join(f"{100 * r[k]:.2f}" if k in r else "-"
                          for k in ("exam_agreement", "generator_exam_agreement", "confident_exam_agreement"))
        by_method = " / ".join(f"{100 * a:.2f}" for a in r.get("methods_test_accuracy", {}).values()) or "-"
        lines.append(
            f"| {name} | {r['calibration']} | {r.get('method', '-')} | {100 * r['test_accuracy']:.2f} | {by_method} | "
            f"{exam} | "
            f"{r['bytes']:,} | {fp32['bytes'] / r['bytes']:.2f}x | {r['batch1_ms']:.3f} | {r['batch64_ms']:.2f} | "
            f"{fp32['batch1_min_ms'] / r['batch1_min_ms']:.2f}x / "
            f"{fp32['batch64_min_ms'] / r['batch64_min_ms']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.int8", description=__doc__.split("\n\n")[0])
    parser.add_argument("teacher", choices=sorted(TEACHERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per model and batch")
    parser.add_argument("--budget-s", type=float, default=10.0, help="seconds of timing per batch size")
    parser.add_argument("--config", type=json.loads, default={}, help="JSON config sections over the teacher's")
    parser.add_argument("--no-job", action="store_true", help="no compression job: the teacher's ONNX file "
                        "quantized with Gaussian and real calibration only (no generators, so no int8 row)")
    parser.add_argument("--both-ranges", action="store_true", help="every int8 row also with the other weight "
                        "range (compression.quantize_reduce_range flipped), on the same student")
    parser.add_argument("--bias-correction", action="store_true", help="every int8 row also bias-corrected on "
                        "its calibration samples (kegnet.compression.bias_correction), suffixed -bc")
    parser.add_argument("--adaptive-rounding", action="store_true", help="every int8 row also with its weights "
                        "rounded up or down on its calibration samples (kegnet.compression.rounding), suffixed -ar")
    parser.add_argument("--both-equalization", action="store_true", help="every int8 row also with the range "
                        "equalization (compression.quantize_equalize) flipped, on the same student")
    parser.add_argument("--out", type=Path, help="JSON of the rows")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        result = run(args.teacher, args.seed, args.threads, Path(tmp), args.repeats, args.budget_s, args.config,
                     not args.no_job, args.both_ranges, args.bias_correction, args.both_equalization,
                     args.adaptive_rounding)
    result |= {"command": "python -m bench.int8 " + shlex.join(sys.argv[1:]), "machine": platform.processor()
               or platform.machine(), "date": time.strftime("%Y-%m-%d")}
    print(table(result))
    if "job_seconds" in result:
        print(f"job: ratio {result['compression_ratio']:.2f}x, recipe {result['recipe']}, "
              f"{result['job_seconds']:.0f}s; warnings: {result['warnings']}")
        print(job_choice(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
