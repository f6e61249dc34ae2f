"""The classifier task: load → plan → generators → decompose → finetune → export.

The teacher (or a teacher ensemble) is the only input. The compression is planned (layers, ranks, measured
latency) before the generators train, so a bad plan fails in seconds, not after the longest stage; KegNet
generators then make the samples, the planned layers are factorized (Tucker-2 / SVD), one student per sample
recipe is fine-tuned by distillation and graded on a common synthetic exam, and the best is exported.
With ``compression.quantize: int8`` the export stage also quantizes ``student.onnx`` on the job's synthetic
samples (kegnet.compression.quantize), and a teacher with no layer worth factorizing is not an error: the
student is the teacher itself, and its int8 model is the point of the job.
Each stage is one function below that reads and fills a ``_Job``; kegnet.pipeline runs them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kegnet import artifacts, export
from kegnet.checkpoint import LoadedTeacher, architecture_of, open_teacher
from kegnet.compression import CompressionPlan, apply_plan, plan_compression, qat, quantize
from kegnet.compression.fit import fit_to_outputs
from kegnet.compression.latency import model_latency
from kegnet.compression.plan import SLOWER, check_layers, drop_slower_layers, replan_ratio
from kegnet.config import MAX_TEACHERS, ClassifierConfig, Recipe, auto_recipe
from kegnet.cost import JobCost, estimate_cost, profile_model
from kegnet.distill import DistillResult, distill
from kegnet.distill.confidence import assess, estimate_of, is_calibrated
from kegnet.distill.ensemble import TeacherEnsemble, member_agreements
from kegnet.distill.exam import Exam, Grade, build_exam, choose, exam_sources, grade
from kegnet.errors import CompressionError, KegnetError, NothingToFactorize, reraise_interrupts
from kegnet.evaluation import evaluate, read_eval_set
from kegnet.generation import KegNetSampler, NoiseSampler, Sampler, train_generators
from kegnet.generation.samplers import MixedSampler
from kegnet.generation.train import batchnorm_prior_applies
from kegnet.metrics import count_macs, count_parameters
from kegnet.models.taps import batchnorm_layers
from kegnet.report import Agreement, ClassifyReport, Quantization, Sizes, Speed, Teachers
from kegnet.spec import ModelSpec
from kegnet.tasks.base import Run, Stage, Task, TaskOutcome, TeacherSource

log = logging.getLogger(__name__)

@dataclass
class _Candidate:
    """A student fine-tuned from one sample recipe, and its exam grade."""

    recipe: Recipe
    student: nn.Module
    result: DistillResult
    grade: Grade


@dataclass
class _Job(Run):
    """The classifier's job state: what each stage adds, in stage order."""

    config: ClassifierConfig
    # load
    teachers: list[nn.Module] = field(default_factory=list)
    teacher: nn.Module | None = None  # the one the student is compressed from
    ensemble: TeacherEnsemble | None = None
    architecture: dict[str, Any] = field(default_factory=dict)
    eval_set: tuple[torch.Tensor, torch.Tensor] | None = None  # the user's labelled data: reported only
    # plan
    plan: CompressionPlan | None = None
    unfactorized: str | None = None  # why no layer is factorized (quantize int8: the teacher is quantized)
    all_slower: bool = False  # keep_slower unset and every factorization ran slower: all kept anyway
    layer_latency: dict[str, dict[str, float]] = field(default_factory=dict)
    # generators
    sampler: Sampler | None = None
    generators: list[nn.Module] | None = None
    generator_curve: list[dict[str, float]] = field(default_factory=list)
    # decompose
    agreements: list[float] | None = None
    fit: dict[str, Any] | None = None  # compression.fit outputs / auto: per-layer output errors, the choice
    # finetune
    exam: Exam | None = None
    before: Grade | None = None  # the decomposed student's exam grade
    candidates: dict[str, _Candidate] = field(default_factory=dict)
    chosen: str | None = None
    distill_result: DistillResult | None = None
    # export
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    exported: dict[str, Any] = field(default_factory=dict)  # onnx_skipped, onnx_check, program_skipped
    quantization: Quantization | None = None


# 1. load ------------------------------------------------------------------------------------------------
def _load(job: _Job) -> None:
    """Build every teacher (all of one spec), then read the evaluation set if any; a bad file's error names
    which one it is."""
    sources, eval_set = job.inputs.sources, job.inputs.eval_set
    job.report("load", 0.0, "loading the teacher")
    loaded: list[LoadedTeacher] = []
    for i, source in enumerate(sources):
        if len(sources) > 1:
            job.report("load", i / len(sources), f"loading teacher {i + 1} of {len(sources)}")
        try:
            loaded.append(_open(source, job.spec, job.inputs.max_parameters, job.inputs.max_bytes))
        except KegnetError as exc:
            if len(sources) == 1:
                raise
            raise type(exc)(f"checkpoint {i + 1} of {len(sources)} (index {i}): {exc}") from exc
    job.spec = loaded[0].spec  # an ONNX graph fills in input shape and classes
    if isinstance(eval_set, str | Path):
        job.eval_set = read_eval_set(eval_set, job.spec, job.inputs.max_eval_samples)
    elif eval_set is not None:
        job.eval_set = (eval_set[0].float().cpu(), eval_set[1].long().cpu())
    job.architecture = loaded[0].architecture
    job.teachers = [t.model.to(job.device).eval() for t in loaded]
    job.teacher = job.teachers[0]  # unless ensemble_student picks another, after the generators
    dcfg = job.config.distill
    if len(job.teachers) > 1:
        job.ensemble = TeacherEnsemble(job.teachers, weighting=dcfg.ensemble_weighting, temperature=dcfg.temperature,
                                       tau=dcfg.ensemble_temperature, mc_passes=dcfg.mc_dropout_passes)
    job.report("load", 1.0, "teacher loaded" if len(job.teachers) == 1 else f"{len(job.teachers)} teachers loaded",
               parameters=count_parameters(job.teacher))


def _open(source: TeacherSource, spec: ModelSpec, max_parameters: int | None, max_bytes: int | None
          ) -> LoadedTeacher:
    if not isinstance(source, nn.Module):
        return open_teacher(source, spec, max_parameters=max_parameters, max_bytes=max_bytes)
    if not spec.resolved:
        raise KegnetError("a teacher passed as a module needs input_shape and num_classes in its spec")
    return LoadedTeacher(source, spec, architecture_of(spec))


# 2. plan -----------------------------------------------------------------------------------------------
def _plan(job: _Job) -> None:
    """Layers and ranks on the teacher, then drop the factorizations that run slower on this device."""
    job.report("plan", 0.0, "choosing layers and ranks")
    cfg = job.config.compression
    try:
        job.plan = plan_compression(job.teacher, cfg)
    except NothingToFactorize as exc:
        if cfg.quantize != "int8":
            raise
        job.plan, job.unfactorized = CompressionPlan(), str(exc)
    if job.plan.layers:
        job.report("plan", 0.3, f"timing {len(job.plan.layers)} layers, original and factorized")
        planned = CompressionPlan(list(job.plan.layers), dict(job.plan.skipped))
        job.layer_latency = drop_slower_layers(job.teacher, job.plan, job.spec.input_shape, job.device, cfg,
                                               should_cancel=job.report.should_cancel)
        if not job.plan.layers and cfg.keep_slower is None and cfg.quantize != "int8":
            # Nobody chose speed over size: a smaller student beats a failed job (the job warns it is not faster).
            job.plan, job.all_slower = planned, True
    if not job.plan.layers and job.unfactorized is None:
        job.unfactorized = (f"every factorization ran slower than its layer on {job.device.type} at batch "
                            f"{cfg.latency_batch}, so none is worth making")
        if cfg.quantize != "int8":
            raise CompressionError(f"{job.unfactorized}; set compression.keep_slower to compress anyway, raise "
                                   "latency_batch, or quantize the teacher instead (compression.quantize int8)")
    if job.unfactorized is not None:  # quantize int8: the student is the teacher, quantized at export
        job.report("plan", 1.0, f"no layer to factorize ({job.unfactorized}): the teacher will be quantized")
        return
    job.plan = replan_ratio(job.teacher, job.plan, cfg)  # the target ratio, from the layers kept
    job.report("plan", 1.0, f"{len(job.plan.layers)} layers to factorize",
               ranks={p.name: [p.in_rank, p.out_rank] for p in job.plan.layers})


# 3. generate -------------------------------------------------------------------------------------------
def _generate(job: _Job) -> None:
    """KegNet generators (trained here unless given), or the noise baselines' samplers."""
    generators = job.inputs.generators
    config, gcfg, dcfg, dev = job.config, job.config.generator, job.config.distill, job.device
    if config.method == "kegnet":
        if generators is None:  # none passed in (a rerun with other compression settings passes them)
            def on_gen_step(step: int, metrics: dict[str, float]) -> None:
                job.generator_curve.append({"step": step, **metrics})
                job.report("generators", step / gcfg.steps, f"generator step {step}/{gcfg.steps}", step=step,
                           total=gcfg.steps, **metrics)

            # Generators learn against the plain mean of the teachers' probabilities: a sample then only has
            # to be class y for some teacher, so teachers of different domains each contribute samples of
            # their own domain. Uncertainty weights are for the student's targets only: through them a
            # generator could lower its loss by choosing whom to convince.
            target = job.teacher if job.ensemble is None else TeacherEnsemble(job.teachers, weighting="mean",
                                                                               temperature=1.0)
            generators = train_generators(
                target, job.spec.input_shape, job.spec.num_classes, gcfg, device=dev, seed=job.seed,
                on_step=on_gen_step, should_cancel=job.report.should_cancel,
                report_every=max(1, min(50, gcfg.steps // 20 or 1)),
            )
        job.sampler = KegNetSampler([g.to(dev).eval() for g in generators], job.spec.num_classes, gcfg.noise_dim,
                                    dev, "one_hot" if dcfg.label_codes == "auto" else dcfg.label_codes)
        job.generators = job.sampler.generators
    elif config.method != "tucker-only":
        job.sampler = NoiseSampler(config.method, job.spec.input_shape, dev)
    if job.sampler is None:
        job.report("generators", 1.0, "no samples: this method fine-tunes nothing", skipped=True)
    elif generators is not None and not job.generator_curve:
        job.report("generators", 1.0, "generators given; not trained again")
    else:
        job.report("generators", 1.0, "samples ready")


# 4. decompose ------------------------------------------------------------------------------------------
def _decompose(job: _Job) -> None:
    """Factorize the planned layers (with several teachers, first choose which one to compress)."""
    dcfg = job.config.distill
    if job.ensemble is not None and job.sampler is not None:
        probe_x, _ = job.sampler.sample(dcfg.holdout_samples,
                                        torch.Generator(device=job.device).manual_seed(job.seed + 104_729))
        job.agreements = member_agreements(job.ensemble, probe_x)
        if dcfg.ensemble_student == "best":
            job.ensemble.base = max(range(len(job.teachers)), key=lambda i: job.agreements[i])  # first of equals
            if job.teachers[job.ensemble.base] is not job.teacher:
                job.teacher = job.teachers[job.ensemble.base]
                # Same architecture, so the same layers; ranks are chosen again on this teacher's weights.
                kept = {p.name for p in job.plan.layers}
                job.plan = plan_compression(job.teacher, job.config.compression)
                job.plan.layers = [p for p in job.plan.layers if p.name in kept]
    elif job.ensemble is not None and dcfg.ensemble_student == "best":
        log.info("ensemble_student=best needs synthetic samples; method %s has none: compressing teacher 0",
                 job.config.method)
    job.student = apply_plan(job.teacher, job.plan, n_iter_max=job.config.compression.n_iter_max, seed=job.seed,
                             should_cancel=job.report.should_cancel).to(job.device)
    if job.config.compression.fit != "weights":
        _fit_outputs(job)
    ratio = count_parameters(job.teacher) / count_parameters(job.student)
    job.report("decompose", 1.0, f"{len(job.plan.layers)} layers factorized",
               ranks={p.name: [p.in_rank, p.out_rank] for p in job.plan.layers}, compression_ratio=ratio)


# compression.fit auto refits only a weight fit that has lost most of what the teacher computes: one whose
# synthetic exam estimate is below this. On the robustness suite (docs/benchmarks.md, issue 21) the refit won
# 9 points after fine-tuning where the weight fit scored 0.12-0.18 (timm lcnet_050) and lost 0.3-9 points
# where it scored 0.39 and above (LeNet-5, UCI MLPs): a start already close is better left to fine-tuning.
REFIT_BELOW = 0.3


def _fit_outputs(job: _Job) -> None:
    """Refit the factorized layers to the teacher's layer outputs on the job's samples: the generators with
    the label codes the job would use alone (``auto``: by input kind and class count), whatever the recipes,
    so that every candidate starts from the same student; a method without samples keeps the weight fit.
    ``fit: auto`` refits only a weight fit whose exam estimate is below ``REFIT_BELOW``, and keeps the refit
    only if the exam scores it at least as high."""
    cfg, dcfg = job.config.compression, job.config.distill
    if job.sampler is None:
        job.fit = {"method": "weights", "why": f"method {job.config.method} draws no samples to fit to"}
        return
    scores: dict[str, float] = {}
    if cfg.fit == "auto":
        scores["weights"] = _estimate(grade(job.student, _exam(job)))
        if scores["weights"] >= REFIT_BELOW:
            job.fit = {"method": "auto", "exam": scores, "chosen": "weights",
                       "why": f"the weight fit's exam estimate {scores['weights']:.3f} is at least {REFIT_BELOW}"}
            return
    recipe = auto_recipe(len(job.spec.input_shape) == 3, job.spec.num_classes)
    codes = recipe.codes if dcfg.label_codes == "auto" else dcfg.label_codes
    sampler = job.sampler.with_codes(codes) if isinstance(job.sampler, KegNetSampler) else job.sampler
    recipe = Recipe(codes=codes) if isinstance(job.sampler, KegNetSampler) else Recipe(source=job.config.method)
    job.report("decompose", 0.5, f"fitting {len(job.plan.layers)} layers to the teacher's outputs")
    x, _ = sampler.sample_many(cfg.fit_samples, torch.Generator(device=job.device).manual_seed(job.seed + 31_337))
    t0 = time.perf_counter()
    weight_fit = copy.deepcopy(job.student) if cfg.fit == "auto" else None
    layers = fit_to_outputs(job.teacher, job.student, job.plan, x, should_cancel=job.report.should_cancel)
    job.fit = {"method": cfg.fit, "samples": cfg.fit_samples, "recipe": recipe.name,
               "seconds": time.perf_counter() - t0, "layers": layers}
    if weight_fit is not None:
        scores["outputs"] = _estimate(grade(job.student, _exam(job)))
        job.fit |= {"exam": scores, "chosen": "outputs" if scores["outputs"] >= scores["weights"] else "weights"}
        if job.fit["chosen"] == "weights":
            job.student = weight_fit


# Hints when distill.feature_weight is unset: after the output refit they keep the layer outputs it matched
# (the suite: +5 points on Fashion lcnet_050 over three seeds, +0.3 on ResNet-14, +0.1 to +2.8 on LeNet-5);
# after a weight fit they cost 0.04-0.7 points on LeNet-5, so none.
HINTS_AFTER_REFIT = 1.0


def _feature_weight(job: _Job) -> float:
    """``distill.feature_weight``, or where unset ``HINTS_AFTER_REFIT`` if the start is the output refit."""
    if job.config.distill.feature_weight is not None:
        return job.config.distill.feature_weight
    refit = job.fit is not None and job.fit.get("chosen", job.fit["method"]) == "outputs"
    return HINTS_AFTER_REFIT if refit else 0.0


def _estimate(g: Grade) -> float:
    """A student's exam score as the confidence estimate reads it (the lower of plain and per-class)."""
    return estimate_of(g.agreement, g.balanced)


def _exam(job: _Job) -> Exam:
    """The job's one synthetic exam (drawn on first use: by the fit's choice, else by fine-tuning)."""
    if job.exam is None:
        kegnet = job.sampler if isinstance(job.sampler, KegNetSampler) else None
        job.exam = build_exam(job.ensemble or job.teacher, exam_sources(kegnet, job.spec.input_shape, job.device),
                              job.config.distill.holdout_samples, job.seed + 7919, job.device)
    return job.exam


# 5. distill --------------------------------------------------------------------------------------------
def _distill(job: _Job) -> None:
    """Fine-tune one student per sample recipe, grade each on the common synthetic exam, keep the best.

    Each candidate starts from the same decomposed student with the same seeds, so a recipe's student is
    the same whether it is trained alone or among others. Nothing to fine-tune for tucker-only or zero
    steps: the decomposed student is graded and kept.
    """
    dcfg, dev = job.config.distill, job.device
    teacher = job.ensemble or job.teacher
    kegnet = job.sampler if isinstance(job.sampler, KegNetSampler) else None
    job.report("finetune", 0.0, "drawing the synthetic exam")
    job.before = grade(job.student, _exam(job))
    image = len(job.spec.input_shape) == 3
    # Nothing factorized (quantize int8): the student is the teacher, nothing to fine-tune.
    recipes = job.config.candidate_recipes(image, job.spec.num_classes) if dcfg.steps > 0 and job.plan.layers else []
    base, hints = job.student, _feature_weight(job)
    if job.fit is not None and recipes:
        job.fit["feature_weight"] = hints  # the hints that followed this start
    for i, recipe in enumerate(recipes):
        student = base if len(recipes) == 1 else copy.deepcopy(base)
        name = recipe.name

        def on_eval(step: int, metrics: dict[str, float], i: int = i, name: str = name) -> None:
            what = f"student step {step}/{dcfg.steps}" if len(recipes) == 1 else (
                f"recipe {i + 1}/{len(recipes)} ({name}): student step {step}/{dcfg.steps}")
            if "lr" in metrics:  # the retry from the start (kegnet.distill.train.distill)
                what += f", again at lr {metrics['lr']:.2g}: the first pass fell below the start"
            job.report("finetune", (i + step / dcfg.steps) / len(recipes), what, step=step, total=dcfg.steps,
                       recipe=name, **metrics)

        # Dropout in the student draws from the global generator: reseed, so that a candidate is the same
        # student whether the generators were trained in this run or passed in, alone or among others.
        torch.manual_seed(job.seed + 1)
        sampler: Sampler = (kegnet.with_codes(recipe.codes) if recipe.source == "kegnet" and kegnet is not None
                            else NoiseSampler(recipe.source, job.spec.input_shape, dev))
        cfg = dcfg.model_copy(update={"noise_share": recipe.noise_share if recipe.source == "kegnet" else 0.0,
                                      "feature_weight": hints})
        result = distill(
            teacher, student, sampler, cfg, device=dev, seed=job.seed,
            num_sources=len(job.generators) if job.generators else 1, on_eval=on_eval,
            should_cancel=job.report.should_cancel, diversity_beta=job.config.generator.beta,
            feature_layers=[p.name for p in job.plan.layers], exam=job.exam)
        job.candidates[name] = _Candidate(recipe, student, result, grade(student, job.exam))
    if not job.candidates:
        job.report("finetune", 1.0, "no fine-tuning for this method", skipped=True,
                   exam_agreement=job.before.agreement)
        return
    job.chosen = choose({name: c.grade for name, c in job.candidates.items()})
    chosen = job.candidates[job.chosen]
    job.student, job.distill_result = chosen.student, chosen.result
    job.report("finetune", 1.0, "student ready" if len(recipes) == 1 else f"kept {job.chosen}",
               recipe=job.chosen, exam_agreement=chosen.grade.agreement)


# 6. export ---------------------------------------------------------------------------------------------
def _export(job: _Job) -> None:
    """Latency of teacher and student on the job's device, the evaluation if any, then the files."""
    assert job.teacher is not None and job.student is not None and job.plan is not None
    spec, config, out, cfg = job.spec, job.config, job.out, job.config.compression
    job.report("export", 0.0, "measuring latency")
    if job.eval_set is not None:
        job.report("export", 0.0, f"scoring on the {len(job.eval_set[1])} labelled samples given")
        students = {name: c.student for name, c in job.candidates.items()} or {"decomposed": job.student}
        job.evaluation = evaluate(job.teacher, students, job.chosen, *job.eval_set, spec.num_classes, job.device)
    timing = {"repeats": cfg.latency_repeats, "budget_s": cfg.latency_budget_s,
              "should_cancel": job.report.should_cancel}
    job.latency = {"teacher": model_latency(job.teacher.eval(), spec.input_shape, job.device, **timing),
                   "student": model_latency(job.student.eval(), spec.input_shape, job.device, **timing)}
    student = job.student = job.student.cpu().eval()
    for t in job.teachers:
        t.cpu()
    export.save_weights(student, spec, job.plan, out / artifacts.WEIGHTS)
    job.exported = {"program_skipped": _export_program(student, spec, config, out),
                    "onnx_skipped": None, "onnx_check": None}
    if config.export_onnx:
        converted = spec.arch == "onnx"  # an onnx2torch graph: only the traced exporter takes it
        skipped = export.export_onnx(student, spec.input_shape, out / artifacts.ONNX, traced=converted)
        job.exported["onnx_skipped"] = skipped
        if skipped:
            log.warning("no ONNX file: %s", skipped)
        else:
            job.exported["onnx_check"] = export.check_onnx(out / artifacts.ONNX, student, spec.input_shape, job.seed)
    if cfg.quantize == "int8":
        job.report("export", 0.5, "quantizing to int8 on synthetic samples")
        job.quantization = _quantize(job)
    result = job.distill_result
    export.plot_curves(job.generator_curve, result.curve if result else [], out / artifacts.CURVES)
    if isinstance(job.sampler, KegNetSampler) and len(spec.input_shape) == 3:
        export.plot_samples(job.sampler, spec.num_classes, out / artifacts.SAMPLES, seed=job.seed)
    job.report("export", 1.0, "artifacts written")


CALIBRATION_SEED = 15_485_863  # added to the job's seed: calibration draws apart from the exam's and training's
QAT_SEED = 32_452_843  # and the fake-quantized fine-tuning's draws apart from both


def calibration_set(recipe: Recipe | None, kegnet: KegNetSampler | None, input_shape: tuple[int, ...], n: int,
                    seed: int, device: torch.device) -> tuple[torch.Tensor, str]:
    """``n`` synthetic calibration samples (on the CPU) of ``calibration_sampler``'s source, and its name."""
    sampler, source = calibration_sampler(recipe, kegnet, input_shape, device)
    return draw_calibration(sampler, n, seed, device), source


def draw_calibration(sampler: Sampler, n: int, seed: int, device: torch.device) -> torch.Tensor:
    """``n`` samples of ``sampler`` on the CPU, drawn apart from the exam's and training's."""
    rng = torch.Generator(device=device).manual_seed(seed + CALIBRATION_SEED)
    return sampler.sample_many(n, rng)[0].cpu()


def calibration_sampler(recipe: Recipe | None, kegnet: KegNetSampler | None, input_shape: tuple[int, ...],
                        device: torch.device) -> tuple[Sampler, str]:
    """The int8 step's samples: ``recipe``'s mix (the generators asked for its codes with its share of Gaussian
    noise, or its noise alone), or Gaussian noise where there is no recipe (tucker-only) or no generator; and the
    name of that source."""
    gaussian = NoiseSampler("gaussian", input_shape, device)
    sampler: Sampler = gaussian
    if recipe is not None and recipe.source == "kegnet" and kegnet is not None:
        sampler = kegnet.with_codes(recipe.codes)
        if recipe.noise_share:
            sampler = MixedSampler(sampler, gaussian, recipe.noise_share)
    elif recipe is not None and recipe.source != "kegnet":
        sampler = NoiseSampler(recipe.source, input_shape, device)
    return sampler, recipe.name if recipe is not None and sampler is not gaussian else "gaussian"


def _quantize(job: _Job) -> Quantization:
    """``student.int8.onnx`` from ``student.onnx`` (kegnet.compression.quantize), or why there is none."""
    assert job.exam is not None
    missing = job.exported["onnx_skipped"] or quantize.missing_runtime()
    if missing:
        return Quantization(kept=False, reason=f"no student.onnx to quantize: {missing}")
    cfg = job.config.compression
    # The kept recipe's mix; where none was trained (nothing factorized, no steps), the one that would have been.
    recipes = job.config.candidate_recipes(len(job.spec.input_shape) == 3, job.spec.num_classes)
    recipe = job.candidates[job.chosen].recipe if job.chosen else (recipes[0] if recipes else None)
    kegnet = job.sampler if isinstance(job.sampler, KegNetSampler) else None
    sampler, source = calibration_sampler(recipe, kegnet, job.spec.input_shape, job.device)
    calibration = draw_calibration(sampler, cfg.quantize_samples, job.seed, job.device)
    exam = Exam(job.exam.x.cpu(), job.exam.teacher_logits.cpu(), job.exam.sources)
    try:
        with contextlib.ExitStack() as stack:
            fp32, finetune = job.out / artifacts.ONNX, {}
            # Noise is not the inputs: rounding fit to it would mislead, so only the generators' samples train.
            if cfg.quantize_finetune_steps and source.startswith("kegnet"):
                work = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=job.out, prefix=".qat-")))
                fp32, finetune = _finetuned_copy(job, sampler, calibration, work)
            result = _quantize_file(job, fp32, calibration, source, exam)
        return result.model_copy(update={"finetune": finetune}) if finetune else result
    except Exception as e:  # noqa: BLE001 - the int8 file is an extra: a quantizer failure must not lose the job
        reraise_interrupts(e)
        log.exception("int8 quantization failed")
        return Quantization(kept=False, calibration={"source": source, "samples": len(calibration)},
                            reason=f"quantizing it failed ({type(e).__name__}: {e})")


def _finetuned_copy(job: _Job, sampler: Sampler, calibration: torch.Tensor, work: Path) -> tuple[Path, dict[str, Any]]:
    """A copy of the student fine-tuned for ``compression.quantize_finetune_steps`` on ``sampler`` through fake
    quantization (kegnet.compression.qat), exported to ``work`` as the fp32 ONNX file to quantize; and what the
    fine-tuning did."""
    steps = job.config.compression.quantize_finetune_steps
    job.report("export", 0.6, f"fine-tuning a copy through int8 rounding ({steps} steps)")
    t0, teacher = time.perf_counter(), job.teacher
    assert teacher is not None
    try:  # the export stage moved the teachers to the CPU; the fine-tuning runs on the job's device
        tuned = qat.finetune_quantized(job.student, teacher.to(job.device), sampler, calibration, steps=steps,
                                       reduce_range=job.config.compression.quantize_reduce_range,
                                       device=job.device, seed=job.seed + QAT_SEED,
                                       should_cancel=job.report.should_cancel)
    finally:
        teacher.cpu()
    path = work / artifacts.ONNX
    skipped = export.export_onnx(tuned.cpu(), job.spec.input_shape, path, traced=job.spec.arch == "onnx")
    if skipped:
        raise RuntimeError(f"the fine-tuned copy could not be exported: {skipped}")
    return path, {"steps": steps, "seconds": round(time.perf_counter() - t0, 3)}


def _quantize_file(job: _Job, fp32: Path, calibration: torch.Tensor, source: str, exam: Exam) -> Quantization:
    cfg = job.config.compression
    return quantize.quantize_job(
        fp32, job.out / artifacts.INT8_ONNX, calibration, source, exam, job.spec.input_shape,
        max_drop=cfg.quantize_max_drop, tolerance=cfg.latency_tolerance, threads=torch.get_num_threads(),
        repeats=cfg.latency_repeats, budget_s=cfg.latency_budget_s, seed=job.seed,
        should_cancel=job.report.should_cancel, reduce_range=cfg.quantize_reduce_range,
        # Ranges measured on noise are not the inputs' (equalizing on Gaussian samples lost 0.13-7.31 points on
        # real data in all seven bench pairs, docs/benchmarks.md): only the generators' samples set them.
        equalize_ranges=cfg.quantize_equalize and source.startswith("kegnet"),
        rounding=cfg.quantize_rounding, bias_correction=cfg.quantize_bias_correction,
        keep_slower=cfg.quantize_keep_slower)


def _export_program(student: nn.Module, spec: ModelSpec, config: ClassifierConfig, out: Path) -> str | None:
    """``student.pt2``, or why there is none."""
    if not config.export_portable:
        return None
    if spec.arch == "onnx":  # an onnx2torch graph: torch.export cannot trace its Reshape modules
        return "torch.export cannot trace a graph converted from ONNX; use student.onnx"
    try:
        export.export_program(student, spec.input_shape, out / artifacts.PROGRAM)
    except Exception as exc:  # noqa: BLE001 - some converted graphs cannot be traced; the other files stand
        reraise_interrupts(exc)
        skipped = f"torch.export could not trace this student ({type(exc).__name__})"
        log.warning("no %s: %s", artifacts.PROGRAM, skipped)
        return skipped
    return None


# after the stages: the report --------------------------------------------------------------------------------
EXAM_MEASURE = ("share of the synthetic exam (held-out generator and noise samples, never trained on) on which the "
                "student's top class is the teacher's")


def _calibrated(job: _Job) -> bool:
    """Whether the job's exam is of a kind the confidence levels were calibrated on (is_calibrated)."""
    assert job.teacher is not None
    matched = job.generators is not None and batchnorm_prior_applies(job.teacher, job.config.generator)
    return is_calibrated(job.spec.arch, matched)


def _finish(job: _Job) -> TaskOutcome:
    assert job.teacher is not None and job.student is not None and job.plan is not None and job.before is not None
    spec, result, student = job.spec, job.distill_result, job.student
    params = Sizes(teacher=count_parameters(job.teacher), student=count_parameters(student))
    teachers = Teachers(count=len(job.teachers),
                        weighting=job.ensemble.weighting if job.ensemble is not None else "mean",  # after fallback
                        student_from=job.ensemble.base if job.ensemble is not None else 0,
                        agreement_with_ensemble=job.agreements)
    section = ClassifyReport(
        plan=job.plan.to_dict(), macs=Sizes(teacher=count_macs(job.teacher, spec.input_shape),
                                            student=count_macs(student, spec.input_shape)),
        layer_latency=job.layer_latency, teachers=teachers, recipe=job.chosen,
        confidence=assess({name: c.grade for name, c in job.candidates.items()}, job.chosen, job.before,
                          spec.num_classes, job.exam.sources if job.exam else {}, _calibrated(job)),
        evaluation=job.evaluation, generator_curve=job.generator_curve,
        distill_curve=result.curve if result else [], fit=job.fit, quantization=job.quantization,
        **job.exported)
    agreement = None if result is None else Agreement(
        measure=EXAM_MEASURE, before_finetune=result.initial_agreement, final=result.best_agreement,
        best_step=result.best_step, lr=result.lr, retried=result.retried)
    core = {"architecture": job.architecture, "parameters": params,
            "compression_ratio": params.teacher / params.student, "agreement": agreement,
            "speed": Speed(device=str(job.device), unit="ms", **job.latency), "warnings": _warnings(job)}
    candidates = {name: c.student for name, c in job.candidates.items()}
    return TaskOutcome(section, core, student, job.generators, candidates)


FOLDED_BATCHNORM = "the ONNX graph has no BatchNorm layers, so the generators had no statistics of your data to match"


def _warnings(job: _Job) -> list[str]:
    """What the student's figures say that a user would not expect: slower than its teacher, short of the
    ratio, no int8 model, ranks that all collapsed to 1 (an untrained teacher's weights look like noise to
    EVBMF), or an ONNX convnet without BatchNorm (folded by the exporter: no statistics for the generators)."""
    assert job.plan is not None
    warnings = []
    t, s = job.latency["teacher"], job.latency["student"]
    for batch in ("batch1_ms", "batch64_ms") if job.plan.layers else ():  # else the student is the teacher
        if s.get(batch, 0.0) > t.get(batch, float("inf")) * (1 + job.config.compression.latency_tolerance):
            warnings.append(f"the student is slower than the teacher at {batch[:-3].replace('batch', 'batch ')} on "
                            f"{job.device.type} ({s[batch]:.3g} ms against {t[batch]:.3g} ms); set "
                            "compression.latency_batch to the batch you serve (layers slower there are not "
                            "factorized), or compress less")
    comp, ratio = job.config.compression, count_parameters(job.teacher) / count_parameters(job.student)
    if job.plan.layers and comp.rank_method == "ratio" and ratio < comp.ratio * 0.98:
        slower = any(why.startswith(SLOWER) for why in job.plan.skipped.values())
        why = ("the layers that would have made up the rest ran slower factorized on this device (set "
               "compression.keep_slower to compress them anyway)" if slower else
               "the layers that can be factorized hold too few of the weights, so they were made "
               f"{comp.ratio:g}x smaller instead (name more layers in compression.layers)")
        warnings.append(f"the student is {ratio:.2f}x smaller, short of the {comp.ratio:g}x target: {why}")
    if job.all_slower:
        warnings.append(f"every factorization ran slower than its layer on {job.device.type} at batch "
                        f"{comp.latency_batch}: all were kept, so the student is smaller, not faster here (set "
                        "compression.keep_slower false to fail instead, or compression.quantize int8)")
    if job.unfactorized is not None:
        warnings.append(f"no layer was factorized ({job.unfactorized}): the student is the teacher itself, "
                        "written to be quantized (compression.quantize int8)")
    if (job.spec.arch == "onnx" and job.generators is not None and not batchnorm_layers(job.teacher)
            and any(isinstance(m, nn.Conv2d) for m in job.teacher.modules())):
        warnings.append(f"{FOLDED_BATCHNORM}: if the network was trained with BatchNorm, export it with those "
                        "layers kept (torch.onnx.export(..., dynamo=False, do_constant_folding=False)) so that the "
                        "generators can match their statistics; on an exported timm lcnet_050 the students of the "
                        "folded graph lost 1.9-3.8 points, those of the kept graph 0.1-0.2 on three seeds of four "
                        "(docs/benchmarks.md)")
    if job.quantization is not None and not job.quantization.kept:
        warnings.append(f"kept the fp32 model only: no int8 model, {job.quantization.reason}")
    if job.quantization is not None and job.quantization.slower:
        warnings.append(f"kept student.int8.onnx as compression.quantize_keep_slower asks, but on the worker's CPU "
                        f"{job.quantization.slower}: time it on the hardware you deploy to")
    if job.plan.layers and all(p.in_rank == 1 and p.out_rank == 1 for p in job.plan.layers):
        warnings.append("every factorized layer has rank 1: the student keeps almost nothing of the teacher; "
                        "is the teacher trained? Choose ranks yourself (rank_method ratio or fraction)")
    return warnings


# the task's rules and costs ------------------------------------------------------------------------------
def _check(spec: ModelSpec, config: ClassifierConfig, teachers: int, has_eval_set: bool) -> None:
    """A classifier job takes 1 to ``MAX_TEACHERS`` teachers of one spec, and may take an evaluation set."""
    if not 1 <= teachers <= MAX_TEACHERS:
        raise KegnetError(f"give 1 to {MAX_TEACHERS} teachers, got {teachers}")


def _check_model(model: nn.Module, spec: ModelSpec, config: ClassifierConfig) -> None:
    """The compression plan names layers of this teacher (the latency filter runs later, in the job); with
    quantize int8 a teacher with no layer to factorize is quantized instead."""
    with _unless_int8(config):
        plan_compression(model, config.compression)


def _check_structure(model: nn.Module, spec: ModelSpec, config: ClassifierConfig) -> None:
    """The layers the plan names exist and some can be factorized (the whole plan when no rank needs weights)."""
    with _unless_int8(config):
        check_layers(model, config.compression)


@contextlib.contextmanager
def _unless_int8(config: ClassifierConfig) -> Iterator[None]:
    """A plan with no layer to factorize is refused, unless the job quantizes: then the plan stage quantizes the
    teacher (a layer name that matches nothing is refused either way)."""
    try:
        yield
    except NothingToFactorize:
        if config.compression.quantize != "int8":
            raise


def _cost(model: nn.Module, spec: ModelSpec, config: ClassifierConfig, teachers: int) -> JobCost:
    assert spec.input_shape is not None and spec.num_classes is not None
    return estimate_cost(profile_model(model, spec.input_shape), spec.input_shape, spec.num_classes, config, teachers)


def _rebuild_student(model: nn.Module, metadata: dict[str, str]) -> nn.Module:
    """The factorized layers of the saved plan (``student.safetensors``'s metadata), weights not fitted."""
    return apply_plan(model, CompressionPlan.from_dict(json.loads(metadata[export.PLAN_METADATA])), initialize=False)


TASK = Task(
    name="classify",
    job_type=_Job,
    stages=(Stage("load", 0.02, _load), Stage("plan", 0.03, _plan), Stage("generators", 0.47, _generate),
            Stage("decompose", 0.05, _decompose), Stage("finetune", 0.38, _distill), Stage("export", 0.05, _export)),
    check=_check, check_model=_check_model, check_structure=_check_structure, cost=_cost, finish=_finish,
    rebuild_student=_rebuild_student,
)
