"""The sequence-model task: load → compress → sample → finetune → export.

No data is read. The teacher's own generations are the data: ancestral samples from BOS (the transfer set of
word-level distillation) and, for sequence-level distillation (Kim & Rush 2016), the teacher's beam-search
completions of prompts cut from those samples. The student is the teacher, optionally with fewer blocks, with
its blocks' Linear layers factorized by SVD (and optionally its embedding); the step kept is the one whose
greedy decodes agree best with the teacher's on held-out prompts sampled with another seed.
Each stage is one function below that reads and fills a ``_Job``; kegnet.pipeline runs them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kegnet import artifacts, export
from kegnet.checkpoint import LoadedTeacher, architecture_of, open_teacher
from kegnet.config import SequenceJobConfig
from kegnet.cost import JobCost, estimate_sequence_cost, profile_model
from kegnet.errors import KegnetError
from kegnet.metrics import count_parameters
from kegnet.report import Agreement, SequenceReport, Sizes, Speed
from kegnet.sequence.compress import check_student_layers, compress_sequence_model, compressed_structure
from kegnet.sequence.distill import SequenceDistillResult, distill_sequence
from kegnet.sequence.generate import Sequences, beam_search, diversity, greedy_decode, sample_sequences
from kegnet.sequence.prompts import Prompts, cut_prompts
from kegnet.sequence.speed import decode_speed, export_program
from kegnet.spec import ModelSpec, SequenceSpec
from kegnet.tasks.base import Run, Stage, Task, TaskOutcome

log = logging.getLogger(__name__)

TOKEN_MEASURE = ("share of the teacher's generated tokens that the student's greedy completion of the same "
                 "held-out prompt (sampled from the teacher, never trained on) matches at the same position")
EXACT_MEASURE = "share of held-out prompts whose greedy completion is identical to the teacher's"


@dataclass
class _Job(Run):
    """The sequence task's job state: what each stage adds, in stage order."""

    config: SequenceJobConfig
    # load
    teacher: nn.Module | None = None
    architecture: dict[str, Any] = field(default_factory=dict)
    # compress
    compression: dict[str, Any] = field(default_factory=dict)
    # sample
    samples: Sequences | None = None  # the transfer set (word level)
    beams: torch.Tensor | None = None  # the teacher's beam completions of prompts (sequence level)
    holdout: Prompts | None = None
    teacher_greedy: Sequences | None = None  # the teacher's greedy completions of the held-out prompts
    generation: dict[str, Any] = field(default_factory=dict)
    # finetune
    before: dict[str, float] = field(default_factory=dict)  # the SVD student's agreement, before fine-tuning
    result: SequenceDistillResult | None = None
    # export
    after: dict[str, float] = field(default_factory=dict)
    speed: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def tokens(self) -> SequenceSpec:
        assert self.spec.sequence is not None
        return self.spec.sequence


# 1. load ------------------------------------------------------------------------------------------------
def _load(job: _Job) -> None:
    job.report("load", 0.0, "loading the teacher")
    (source,) = job.inputs.sources
    if isinstance(source, nn.Module):
        loaded = LoadedTeacher(source, job.spec, architecture_of(job.spec))
    else:
        loaded = open_teacher(source, job.spec, max_parameters=job.inputs.max_parameters,
                              max_bytes=job.inputs.max_bytes)
    job.teacher = loaded.model.to(job.device).eval()
    for p in job.teacher.parameters():
        p.requires_grad_(False)
    job.architecture = loaded.architecture
    job.report("load", 1.0, f"teacher loaded: {count_parameters(job.teacher):,} parameters")


# 2. compress: the student's structure and its SVD initialization (seconds; fails before any generation) -------
def _compress(job: _Job) -> None:
    assert job.teacher is not None
    job.report("compress", 0.0, "factorizing the Linear layers")
    c = job.config.sequence
    job.student, job.compression = compress_sequence_model(
        job.teacher, job.config.compression, embedding_rank=c.embedding_rank, seed=job.seed,
        student_layers=c.student_layers)
    job.student.to(job.device)
    job.report("compress", 1.0, f"student: {job.compression['ratio']:.2f}x fewer parameters",
               compression_ratio=job.compression["ratio"])


# 3. sample: the teacher's own samples, its beam completions, and held-out prompts -------------------------
def _sample(job: _Job) -> None:
    assert job.teacher is not None
    c, t = job.config.sequence, job.tokens
    decoding = dict(bos_id=t.bos_id, eos_id=t.eos_id, pad_id=t.pad_id, max_length=t.max_length, device=job.device,
                    batch_size=c.generation_batch, should_cancel=job.report.should_cancel)
    sampling = dict(decoding, temperature=c.sample_temperature, top_k=c.top_k, top_p=c.top_p)
    job.report("sample", 0.0, f"sampling {c.samples:,} sequences from the teacher")
    job.samples = sample_sequences(job.teacher, c.samples, generator=_generator(job.seed, job.device), **sampling)
    job.generation["diversity"] = diversity(job.samples.tokens, job.samples.lengths, job.samples.prefix_lengths,
                                            eos_id=t.eos_id).to_dict()
    job.generation["mean_length"] = job.samples.lengths.float().mean().item()
    job.report("sample", 0.4, "teacher samples drawn", **job.generation["diversity"])

    if c.objective in ("sequence", "both"):
        job.report("sample", 0.45, f"beam search (K={c.beam_size}) on {c.samples:,} prompts")
        prompts = cut_prompts(job.samples, t, _generator(job.seed + 1, torch.device("cpu")))
        beams = beam_search(job.teacher, prompts.tokens.to(job.device), prompts.lengths.to(job.device),
                            beam_size=c.beam_size, length_penalty=c.length_penalty, **decoding)
        job.beams = beams.tokens
        job.generation["beam_mean_length"] = beams.lengths.float().mean().item()

    # Held-out prompts: their own seed, never trained on; the teacher's greedy completions are the answers.
    job.report("sample", 0.9, f"{c.holdout} held-out prompts for model selection")
    held = sample_sequences(job.teacher, c.holdout, generator=_generator(job.seed + 2, job.device), **sampling)
    job.holdout = cut_prompts(held, t, _generator(job.seed + 3, torch.device("cpu")))
    job.teacher_greedy = _greedy(job, job.teacher, job.holdout)
    job.report("sample", 1.0, "generations ready")


def _greedy(job: _Job, model: nn.Module, prompts: Prompts) -> Sequences:
    t = job.tokens
    return greedy_decode(model, prompts.tokens.to(job.device), prompts.lengths.to(job.device), bos_id=t.bos_id,
                         eos_id=t.eos_id, pad_id=t.pad_id, max_length=t.max_length, device=job.device,
                         batch_size=job.config.sequence.generation_batch, should_cancel=job.report.should_cancel)


def agreement(job: _Job, student: nn.Module) -> dict[str, float]:
    """The student's greedy completions of the held-out prompts against the teacher's: the share of
    completions identical to the teacher's (``exact``) and of the teacher's generated tokens matched at the
    same position (``token``)."""
    assert job.holdout is not None and job.teacher_greedy is not None
    mine = _greedy(job, student, job.holdout)
    ref = job.teacher_greedy
    width = max(mine.tokens.shape[1], ref.tokens.shape[1])
    a = nn.functional.pad(mine.tokens, (0, width - mine.tokens.shape[1]), value=job.tokens.pad_id)
    b = nn.functional.pad(ref.tokens, (0, width - ref.tokens.shape[1]), value=job.tokens.pad_id)
    cols = torch.arange(width, device=b.device)[None, :]
    generated = (cols >= ref.prefix_lengths[:, None]) & (cols < ref.lengths[:, None])
    same = (a == b) & generated
    exact = ((a == b) | ~generated).all(1) & (mine.lengths == ref.lengths)
    return {"token": same.sum().item() / max(1, generated.sum().item()), "exact": exact.float().mean().item()}


# 4. finetune: how close the SVD student is first (the "SVD-only" figures), then distillation ---------------------
def _finetune(job: _Job) -> None:
    assert job.student is not None and job.teacher is not None and job.samples is not None
    c, t = job.config.sequence, job.tokens
    job.before = agreement(job, job.student.eval())
    job.report("finetune", 0.0, f"SVD student agrees on {job.before['exact']:.1%} of held-out completions",
               agreement_exact=job.before["exact"], agreement_token=job.before["token"])
    if c.steps == 0:
        job.report("finetune", 1.0, "no fine-tuning (steps: 0)", skipped=True)
        return

    def progress(step: int, total: int, metrics: dict[str, float]) -> None:
        job.report("finetune", step / max(1, total), f"step {step}/{total}", step=step, total=total, **metrics)

    job.result = distill_sequence(
        job.student, job.teacher, objective=c.objective,
        samples=job.samples.tokens if c.objective == "word" else None,
        beams=job.beams if c.objective != "word" else None,
        pad_id=t.pad_id, eos_id=t.eos_id, prefix_len=1, steps=c.steps, batch_size=c.batch_size, lr=c.lr,
        temperature=c.temperature, word_weight=c.word_weight, eval_every=c.eval_every,
        score=lambda s: agreement(job, s)["token"], device=job.device, seed=job.seed, progress=progress,
        should_cancel=job.report.should_cancel)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# 5. export --------------------------------------------------------------------------------------------------
def _export(job: _Job) -> None:
    assert job.student is not None and job.teacher is not None
    student = job.student.eval()
    job.report("export", 0.0, "writing the student")
    export.write_weights(student, job.out / artifacts.WEIGHTS, {
        export.SPEC_METADATA: job.spec.model_dump_json(), export.SEQUENCE_REPORT: json.dumps(job.compression)})
    if job.config.export_portable:
        export_program(student, job.tokens, job.out / artifacts.PROGRAM)
    job.after = agreement(job, student)
    job.speed = {"teacher": decode_speed(job.teacher, job.tokens, job.device),
                 "student": decode_speed(student, job.tokens, job.device)}
    job.report("export", 1.0, "done")
    log.info("sequence student: %.2fx, %.1f%% exact agreement", job.compression["ratio"], 100 * job.after["exact"])


# after the stages: the report --------------------------------------------------------------------------------
def _finish(job: _Job) -> TaskOutcome:
    assert job.student is not None and job.teacher is not None
    params = Sizes(teacher=count_parameters(job.teacher), student=count_parameters(job.student))
    r = job.result
    section = SequenceReport(
        compression=job.compression, generation=job.generation,
        exact_agreement=Agreement(measure=EXACT_MEASURE, before_finetune=job.before.get("exact"),
                                  final=job.after["exact"]),
        distill=None if r is None else {"objective": job.config.sequence.objective, "best_step": r.best_step,
                                        "best_score": r.best_score, "loss_curve": r.loss_curve,
                                        "score_curve": r.score_curve})
    core = {"architecture": job.architecture, "parameters": params,
            "compression_ratio": params.teacher / params.student,
            "agreement": Agreement(measure=TOKEN_MEASURE, before_finetune=job.before.get("token"),
                                   final=job.after["token"], best_step=r.best_step if r else None),
            "speed": Speed(device=str(job.device), unit="sequences/s and tokens/s, greedy", **job.speed),
            "warnings": _warnings(job)}
    return TaskOutcome(section, core, job.student)


def _warnings(job: _Job) -> list[str]:
    """A student that decodes slower than its teacher is worth saying so."""
    t, s = job.speed["teacher"], job.speed["student"]
    return [f"the student decodes slower than the teacher at batch {key[5:].split('_')[0]} ({s[key]:.3g} against "
            f"{t[key]:.3g} sequences/s); fewer blocks (sequence.student_layers) is what makes it faster"
            for key in ("batch1_sequences_per_s", "batch64_sequences_per_s") if s.get(key, 0) < 0.95 * t.get(key, 0)]


# the task's rules and costs ------------------------------------------------------------------------------
def _check(spec: ModelSpec, config: SequenceJobConfig, teachers: int, has_eval_set: bool) -> None:
    """What sequence jobs do not take, refused with what to do instead."""
    if teachers != 1:
        raise KegnetError(f"a sequence job takes one teacher (one 'checkpoint' file), got {teachers}")
    if has_eval_set:
        raise KegnetError("eval_set: an evaluation set (x, y) is for classifiers; a sequence job reports agreement "
                          "with the teacher on its own generations")
    if config.compression.fit != "weights":
        raise KegnetError(f"compression.fit '{config.compression.fit}' is for classifier jobs; a sequence job fits "
                          "its factors to the teacher's weights (leave fit out)")


def _check_model(model: nn.Module, spec: ModelSpec, config: SequenceJobConfig) -> None:
    """The student keeps no more blocks than the teacher has (the architecture alone says: meta is fine)."""
    try:
        check_student_layers(model, config.sequence.student_layers)
    except KegnetError as exc:
        raise type(exc)(f"config.sequence: {exc}") from exc


def _cost(model: nn.Module, spec: ModelSpec, config: SequenceJobConfig, teachers: int) -> JobCost:
    assert spec.sequence is not None
    length = spec.sequence.max_length
    return estimate_sequence_cost(profile_model(model, (length,), torch.long), length, spec.sequence.vocab_size,
                                  config)


def _rebuild_student(model: nn.Module, metadata: dict[str, str]) -> nn.Module:
    """The structure the saved compression report describes (kegnet/sequence/compress.py), weights not fitted."""
    return compressed_structure(model, json.loads(metadata[export.SEQUENCE_REPORT]))


TASK = Task(
    name="sequence",
    job_type=_Job,
    stages=(Stage("load", 0.02, _load), Stage("compress", 0.03, _compress), Stage("sample", 0.35, _sample),
            Stage("finetune", 0.55, _finetune), Stage("export", 0.05, _export)),
    check=_check, check_model=_check_model, check_structure=_check_model, cost=_cost, finish=_finish,
    rebuild_student=_rebuild_student,
)
