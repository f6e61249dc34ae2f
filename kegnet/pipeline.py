"""The whole job: load → generators → decompose → fine-tune → export.

``run_pipeline`` is the one entry point used by the CLI and the worker. It reports progress through a
callback, checks a cancel function between steps, and never reads any data: the teacher is the only input.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import tensorly
import torch
from torch import nn

from kegnet import export
from kegnet.checkpoint import load_teacher
from kegnet.compression import apply_plan, plan_compression
from kegnet.config import MAX_TEACHERS, PipelineConfig
from kegnet.distill import distill
from kegnet.distill.ensemble import TeacherEnsemble, member_agreements
from kegnet.errors import Cancelled, KegnetError
from kegnet.events import CancelCheck, ProgressCallback, ProgressEvent, overall_progress
from kegnet.generation import KegNetSampler, NoiseSampler, train_generators
from kegnet.metrics import count_macs, count_parameters
from kegnet.spec import ModelSpec

log = logging.getLogger(__name__)

TeacherSource = str | Path | nn.Module


@dataclass
class RunResult:
    out_dir: Path
    manifest: dict[str, Any]
    student: nn.Module
    generators: list[nn.Module] | None = None  # the KegNet generators, reusable for another setting

    @property
    def artifacts(self) -> dict[str, Path]:
        return {name: self.out_dir / name for name in [*self.manifest["files"], export.MANIFEST]}


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present. Called inside the job, never at import (Celery forks workers)."""
    if device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda" if device == "auto" else device)
    if device == "auto":
        return torch.device("cpu")
    raise KegnetError(f"device {device!r} was requested but this machine has no GPU; use 'auto' or 'cpu'")


class _Reporter:
    """Turns stage-local progress into ``ProgressEvent``s and enforces cancellation."""

    def __init__(self, progress: ProgressCallback | None, should_cancel: CancelCheck | None) -> None:
        self.progress, self.should_cancel = progress, should_cancel

    def __call__(self, stage: str, fraction: float, message: str = "", **metrics: Any) -> None:
        if self.progress:
            self.progress(ProgressEvent(stage=stage, stage_progress=min(max(fraction, 0.0), 1.0),  # type: ignore[arg-type]
                                        progress=overall_progress(stage, fraction), message=message,
                                        metrics=metrics))
        self.check()

    def check(self) -> None:
        if self.should_cancel and self.should_cancel():
            raise Cancelled("cancelled by request")


def _load_teachers(sources: list[TeacherSource], spec: ModelSpec, report: _Reporter) -> list[nn.Module]:
    """Load every teacher (all of one ``spec``); a bad file's error names which one it is."""
    if not 1 <= len(sources) <= MAX_TEACHERS:
        raise KegnetError(f"give 1 to {MAX_TEACHERS} teachers, got {len(sources)}")
    teachers = []
    for i, source in enumerate(sources):
        if len(sources) > 1:
            report("load", i / len(sources), f"loading teacher {i + 1} of {len(sources)}")
        try:
            teachers.append(source if isinstance(source, nn.Module) else load_teacher(source, spec))
        except KegnetError as exc:
            if len(sources) == 1:
                raise
            raise type(exc)(f"checkpoint {i + 1} of {len(sources)} (index {i}): {exc}") from exc
    return teachers


def run_pipeline(
    checkpoint: TeacherSource | Sequence[TeacherSource], spec: ModelSpec, config: PipelineConfig,
    out_dir: str | Path, *, device: str = "auto", seed: int = 0, progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None, generators: list[nn.Module] | None = None,
) -> RunResult:
    """Compress the teacher in ``checkpoint`` (a file path, or an already built model) into ``out_dir``.

    ``checkpoint`` may also be a list of up to ``MAX_TEACHERS`` teachers of the same ``spec``: generators
    are then trained against their plain average, the student is compressed from one of them
    (``config.distill.ensemble_student``) and distilled from their per-sample weighted mixture
    (``config.distill.ensemble_weighting``; see ``kegnet.distill.ensemble``). One teacher in a list is the
    same as one teacher.

    ``generators``: KegNet generators already trained against this teacher (for example by an earlier run at
    another compression setting); the generator stage is then skipped. Raises ``KegnetError`` subclasses for
    bad input (user-facing messages) and ``Cancelled`` on request.
    """
    report = _Reporter(progress, should_cancel)
    dev = resolve_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    timings: dict[str, float] = {}

    # 1. load
    t0 = time.perf_counter()
    report("load", 0.0, "loading the teacher")
    sources = [checkpoint] if isinstance(checkpoint, str | Path | nn.Module) else list(checkpoint)
    teachers = [t.to(dev).eval() for t in _load_teachers(sources, spec, report)]
    teacher = teachers[0]  # the one the student is compressed from, unless ensemble_student picks another
    timings["load"] = time.perf_counter() - t0
    report("load", 1.0, "teacher loaded" if len(teachers) == 1 else f"{len(teachers)} teachers loaded",
           parameters=count_parameters(teacher))
    dcfg = config.distill
    # Generators learn against the plain mean of the teachers' probabilities (not of their log-probabilities):
    # a sample then only has to be class y for some teacher, not for all at once, so teachers of different
    # domains can each contribute samples of their own domain; it is also the family of targets the
    # student learns (a mixture of probabilities). Uncertainty weights are for the student's targets only:
    # through them a generator could lower its loss by choosing whom to convince.
    ensemble = (TeacherEnsemble(teachers, weighting=dcfg.ensemble_weighting, temperature=dcfg.temperature,
                                tau=dcfg.ensemble_temperature, mc_passes=dcfg.mc_dropout_passes)
                if len(teachers) > 1 else None)
    target = teacher if ensemble is None else TeacherEnsemble(teachers, weighting="mean", temperature=1.0)

    # 2. generators (KegNet only; the baselines draw noise)
    t0 = time.perf_counter()
    generator_curve: list[dict[str, float]] = []
    gcfg = config.generator
    if config.method == "kegnet":
        if generators is None:  # none passed in (a rerun with other compression settings passes them)
            def on_gen_step(step: int, metrics: dict[str, float]) -> None:
                generator_curve.append({"step": step, **metrics})
                report("generators", step / gcfg.steps, f"generator step {step}/{gcfg.steps}", **metrics)

            generators = train_generators(
                target, spec.input_shape, spec.num_classes, gcfg, device=dev, seed=seed, on_step=on_gen_step,
                should_cancel=should_cancel, report_every=max(1, min(50, gcfg.steps // 20 or 1)),
            )
        sampler = KegNetSampler([g.to(dev).eval() for g in generators], spec.num_classes, gcfg.noise_dim, dev,
                                dcfg.label_codes)
        num_sources = len(generators)
    else:
        sampler = NoiseSampler(config.method, spec.input_shape, dev) if config.method != "tucker-only" else None
        num_sources = 1
    timings["generators"] = time.perf_counter() - t0
    report("generators", 1.0, "samples ready" if sampler else "no sampler for this method")
    generators = sampler.generators if isinstance(sampler, KegNetSampler) else None

    # 3. decompose (with several teachers, first choose which one)
    t0 = time.perf_counter()
    agreements = None
    if ensemble is not None and sampler is not None:
        probe_x, _ = sampler.sample(dcfg.holdout_samples, torch.Generator(device=dev).manual_seed(seed + 104_729))
        agreements = member_agreements(ensemble, probe_x)
        if dcfg.ensemble_student == "best":
            ensemble.base = max(range(len(teachers)), key=lambda i: agreements[i])  # first of equals
            teacher = teachers[ensemble.base]
    elif ensemble is not None and dcfg.ensemble_student == "best":
        log.info("ensemble_student=best needs synthetic samples; method %s has none: compressing teacher 0",
                 config.method)
    plan = plan_compression(teacher, config.compression)
    student = apply_plan(teacher, plan, n_iter_max=config.compression.n_iter_max, seed=seed).to(dev)
    params_before, params_after = count_parameters(teacher), count_parameters(student)
    ranks = {p.name: [p.in_rank, p.out_rank] for p in plan.layers}
    timings["decompose"] = time.perf_counter() - t0
    report("decompose", 1.0, f"{len(plan.layers)} layers factorized", ranks=ranks,
           compression_ratio=params_before / params_after)

    # 4. fine-tune
    t0 = time.perf_counter()
    # Dropout in the student draws from the global generator: reseed, so that this stage gives the same
    # student whether the generators were trained in this run or passed in.
    torch.manual_seed(seed + 1)
    distill_result = None
    if sampler is not None and config.distill.steps > 0:
        def on_eval(step: int, metrics: dict[str, float]) -> None:
            report("finetune", step / dcfg.steps, f"student step {step}/{dcfg.steps}", **metrics)

        distill_result = distill(ensemble or teacher, student, sampler, dcfg, device=dev, seed=seed,
                                 num_sources=num_sources, on_eval=on_eval, should_cancel=should_cancel,
                                 diversity_beta=gcfg.beta, feature_layers=[p.name for p in plan.layers])
    timings["finetune"] = time.perf_counter() - t0
    report("finetune", 1.0, "student ready")

    # 5. export
    t0 = time.perf_counter()
    student = student.cpu().eval()
    for t in teachers:
        t.cpu()
    teacher_cpu = teacher
    export.save_weights(student, spec, plan, out / export.WEIGHTS)
    if config.export_portable:
        export.export_program(student, spec.input_shape, out / export.PROGRAM)
    onnx_skipped = export.export_onnx(student, spec.input_shape, out / export.ONNX) if config.export_onnx else None
    if onnx_skipped:
        log.warning("no ONNX file: %s", onnx_skipped)
    export.plot_curves(generator_curve, distill_result.curve if distill_result else [], out / export.CURVES)
    timings["export"] = time.perf_counter() - t0

    manifest: dict[str, Any] = {
        "spec": spec.model_dump(mode="json"),
        "config": config.model_dump(mode="json"),
        "seed": seed,
        "device": str(dev),
        "plan": plan.to_dict(),
        "parameters": {"teacher": params_before, "student": params_after},
        "macs": {"teacher": count_macs(teacher_cpu, spec.input_shape),
                 "student": count_macs(student, spec.input_shape)},
        "compression_ratio": params_before / params_after,
        "teachers": {
            "count": len(teachers),
            "weighting": ensemble.weighting if ensemble is not None else "mean",  # after any fallback
            "student_from": ensemble.base if ensemble is not None else 0,
            "agreement_with_ensemble": agreements,  # per teacher, on synthetic samples (several teachers)
        },
        "synthetic_agreement": None if distill_result is None else {
            "before_finetune": distill_result.initial_agreement,
            "best": distill_result.best_agreement,
            "best_step": distill_result.best_step,
        },
        "generator_curve": generator_curve,
        "distill_curve": distill_result.curve if distill_result else [],
        "timings_s": timings,
        "onnx_skipped": onnx_skipped,
        "versions": {"kegnet": _version(), "torch": torch.__version__, "tensorly": tensorly.__version__,
                     "safetensors": safetensors.__version__, "python": platform.python_version()},
    }
    export.write_manifest(out, manifest)
    report("export", 1.0, "artifacts written")
    if progress:
        progress(ProgressEvent(stage="done", stage_progress=1.0, progress=1.0, message="done",
                               metrics={"compression_ratio": manifest["compression_ratio"]}))
    log.info("compressed %s: %.2fx in %.1fs", spec.arch, manifest["compression_ratio"], sum(timings.values()))
    return RunResult(out, manifest, student, generators)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kegnet")
    except PackageNotFoundError:
        return "0+unknown"


__all__ = ["RunResult", "resolve_device", "run_pipeline"]
