"""A sequence model's job, as stages: load → plan → generate → decompose → finetune → export.

No data is read. The teacher's own generations are the data: ancestral samples from BOS (the transfer set of
word-level distillation) and, for sequence-level distillation (Kim & Rush 2016), the teacher's beam-search
completions of prompts cut from those samples. The student is the teacher, optionally with fewer blocks, with
its blocks' Linear layers factorized by SVD (and optionally its embedding); the step kept is the one whose
greedy decodes agree best with the teacher's on held-out prompts sampled with another seed.

``kegnet.pipeline.run_pipeline`` dispatches here for ``spec.task == "sequence"``.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import torch
from torch import nn

from kegnet.checkpoint import LoadedTeacher, architecture_of, open_teacher
from kegnet.config import PipelineConfig, SequenceConfig
from kegnet.errors import KegnetError
from kegnet.events import Reporter
from kegnet.export import MANIFEST, PROGRAM, SEQUENCE_REPORT, WEIGHTS, write_manifest, write_weights
from kegnet.metrics import count_parameters
from kegnet.models.registry import DEFAULT_MAX_PARAMETERS
from kegnet.sequence.compress import compress_sequence_model
from kegnet.sequence.distill import SequenceDistillResult, distill_sequence
from kegnet.sequence.generate import Sequences, beam_search, diversity, greedy_decode, sample_sequences
from kegnet.spec import ModelSpec, SequenceSpec

log = logging.getLogger(__name__)


@dataclass
class SequenceRun:
    out_dir: Path
    manifest: dict[str, Any]
    student: nn.Module


@dataclass
class Prompts:
    """Prompts cut from teacher samples, right-padded: ``tokens (N, P)``, ``lengths (N,)``."""

    tokens: torch.Tensor
    lengths: torch.Tensor


@dataclass
class _Job:
    spec: ModelSpec
    tokens: SequenceSpec
    config: SequenceConfig
    pipeline_config: PipelineConfig
    device: torch.device
    seed: int
    out: Path
    report: Reporter
    timings: dict[str, float] = field(default_factory=dict)
    teacher: nn.Module | None = None
    architecture: dict[str, Any] = field(default_factory=dict)
    student: nn.Module | None = None
    compression: dict[str, Any] = field(default_factory=dict)
    samples: Sequences | None = None  # the transfer set (word level)
    beams: torch.Tensor | None = None  # the teacher's beam completions of prompts (sequence level)
    holdout: Prompts | None = None
    teacher_greedy: Sequences | None = None  # the teacher's greedy completions of the held-out prompts
    generation: dict[str, Any] = field(default_factory=dict)
    before: dict[str, float] = field(default_factory=dict)
    result: SequenceDistillResult | None = None

    def timed(self, stage: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(self, *args)
        self.timings[stage] = time.perf_counter() - t0
        return out


def run_sequence_pipeline(source: str | Path | nn.Module, spec: ModelSpec, config: PipelineConfig, out_dir: Path, *,
                          device: torch.device, seed: int, report: Reporter,
                          max_parameters: int | None = DEFAULT_MAX_PARAMETERS,
                          max_bytes: int | None = None) -> SequenceRun:
    """Compress the sequence model in ``source`` (a checkpoint path, or a built model of ``spec``) into
    ``out_dir``: ``student.safetensors``, ``student.pt2`` (its forward pass) and ``manifest.json``."""
    assert spec.sequence is not None
    out_dir.mkdir(parents=True, exist_ok=True)
    job = _Job(spec, spec.sequence, config.sequence, config, device, seed, out_dir, report)
    job.timed("load", _load, source, max_parameters, max_bytes)
    job.timed("plan", _plan)
    job.timed("generators", _generate)
    job.timed("decompose", _decompose)
    job.timed("finetune", _finetune)
    manifest = job.timed("export", _export)
    assert job.student is not None
    return SequenceRun(out_dir, manifest, job.student)


# 1. load ------------------------------------------------------------------------------------------------
def _load(job: _Job, source: str | Path | nn.Module, max_parameters: int | None, max_bytes: int | None) -> None:
    job.report("load", 0.0, "loading the teacher")
    if isinstance(source, nn.Module):
        loaded = LoadedTeacher(source, job.spec, architecture_of(job.spec))
    else:
        loaded = open_teacher(source, job.spec, max_parameters=max_parameters, max_bytes=max_bytes)
    job.teacher = loaded.model.to(job.device).eval()
    for p in job.teacher.parameters():
        p.requires_grad_(False)
    job.architecture = loaded.architecture
    job.report("load", 1.0, f"teacher loaded: {count_parameters(job.teacher):,} parameters")


# 2. plan: the student's structure and its SVD initialization (seconds; fails before any generation) -----------
def _plan(job: _Job) -> None:
    assert job.teacher is not None
    job.report("plan", 0.0, "factorizing the Linear layers")
    job.student, job.compression = compress_sequence_model(
        job.teacher, job.pipeline_config.compression, embedding_rank=job.config.embedding_rank, seed=job.seed,
        student_layers=job.config.student_layers)
    job.report("plan", 1.0, f"student: {job.compression['ratio']:.2f}x fewer parameters",
               compression_ratio=job.compression["ratio"])


# 3. generate: the teacher's own samples, its beam completions, and held-out prompts -------------------------
def _generate(job: _Job) -> None:
    assert job.teacher is not None
    c, t = job.config, job.tokens
    sampling = dict(bos_id=t.bos_id, eos_id=t.eos_id, pad_id=t.pad_id, max_length=t.max_length, device=job.device,
                    temperature=c.sample_temperature, top_k=c.top_k, top_p=c.top_p)
    job.report("generators", 0.0, f"sampling {c.samples:,} sequences from the teacher")
    job.samples = sample_sequences(job.teacher, c.samples, generator=_generator(job.seed, job.device), **sampling)
    job.generation["diversity"] = diversity(job.samples.tokens, job.samples.lengths, job.samples.prefix_lengths,
                                            eos_id=t.eos_id).to_dict()
    job.generation["mean_length"] = job.samples.lengths.float().mean().item()
    job.report("generators", 0.4, "teacher samples drawn", **job.generation["diversity"])

    if c.objective in ("sequence", "both"):
        job.report("generators", 0.45, f"beam search (K={c.beam_size}) on {c.samples:,} prompts")
        prompts = cut_prompts(job.samples, t, _generator(job.seed + 1, torch.device("cpu")))
        beams = beam_search(job.teacher, prompts.tokens.to(job.device), prompts.lengths.to(job.device),
                            bos_id=t.bos_id, eos_id=t.eos_id, pad_id=t.pad_id, max_length=t.max_length,
                            device=job.device, beam_size=c.beam_size, length_penalty=c.length_penalty)
        job.beams = beams.tokens
        job.generation["beam_mean_length"] = beams.lengths.float().mean().item()

    # Held-out prompts: their own seed, never trained on; the teacher's greedy completions are the answers.
    job.report("generators", 0.9, f"{c.holdout} held-out prompts for model selection")
    held = sample_sequences(job.teacher, c.holdout, generator=_generator(job.seed + 2, job.device), **sampling)
    job.holdout = cut_prompts(held, t, _generator(job.seed + 3, torch.device("cpu")))
    job.teacher_greedy = _greedy(job, job.teacher, job.holdout)
    job.report("generators", 1.0, "generations ready")


def cut_prompts(samples: Sequences, tokens: SequenceSpec, rng: torch.Generator) -> Prompts:
    """Prompts from sampled sequences: up to and including the first ``sep_id`` when the spec has one and the
    sample contains it; else a uniformly random cut after BOS (at least one token of the sample is kept
    when there is one). Shapes: ``(N, L) -> (N, P)``, ``P`` the longest prompt."""
    seqs, lengths = samples.tokens.cpu(), samples.lengths.cpu()
    n = len(seqs)
    # A random cut in 1..length-1 (the generated part, EOS excluded): the prompt keeps BOS at least.
    last = (lengths - 1).clamp(min=1)
    cut = 1 + (torch.rand(n, generator=rng) * last).long().clamp(max=last - 1)
    if tokens.sep_id is not None:
        is_sep = seqs == tokens.sep_id
        has_sep = is_sep.any(1)
        first_sep = is_sep.float().argmax(1)
        cut = torch.where(has_sep, first_sep + 1, cut)
    cut = cut.clamp(max=tokens.max_length - 1)  # something must be left to complete
    width = int(cut.max())
    out = torch.full((n, width), tokens.pad_id, dtype=torch.long)
    cols = torch.arange(width)
    keep = cols[None, :] < cut[:, None]
    out[keep] = seqs[:, :width][keep]
    return Prompts(out, cut)


def _greedy(job: _Job, model: nn.Module, prompts: Prompts) -> Sequences:
    t = job.tokens
    return greedy_decode(model, prompts.tokens.to(job.device), prompts.lengths.to(job.device), bos_id=t.bos_id,
                         eos_id=t.eos_id, pad_id=t.pad_id, max_length=t.max_length, device=job.device)


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


# 4. decompose: how close the SVD student is before any fine-tuning (the "SVD-only" figures) ------------------
def _decompose(job: _Job) -> None:
    assert job.student is not None
    job.student.to(job.device)
    job.before = agreement(job, job.student.eval())
    job.report("decompose", 1.0, f"SVD student agrees on {job.before['exact']:.1%} of held-out completions",
               agreement_exact=job.before["exact"], agreement_token=job.before["token"])


# 5. finetune ------------------------------------------------------------------------------------------------
def _finetune(job: _Job) -> None:
    assert job.student is not None and job.teacher is not None and job.samples is not None
    c, t = job.config, job.tokens
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


# 6. export --------------------------------------------------------------------------------------------------
def _export(job: _Job) -> dict[str, Any]:
    assert job.student is not None and job.teacher is not None
    student = job.student.eval()
    job.report("export", 0.0, "writing the student")
    write_weights(student, job.out / WEIGHTS, {"kegnet_spec": job.spec.model_dump_json(),
                                               SEQUENCE_REPORT: json.dumps(job.compression)})
    if job.pipeline_config.export_portable:
        export_program(student, job.tokens, job.out / PROGRAM)
    after = agreement(job, student)
    speed = {"teacher": decode_speed(job.teacher, job.tokens, job.device),
             "student": decode_speed(student, job.tokens, job.device)}
    params = {"teacher": count_parameters(job.teacher), "student": count_parameters(student)}
    r = job.result
    manifest: dict[str, Any] = {
        "task": "sequence",
        "spec": job.spec.model_dump(mode="json"),
        "architecture": job.architecture,
        "config": job.pipeline_config.model_dump(mode="json"),
        "seed": job.seed,
        "device": str(job.device),
        "parameters": params,
        "compression_ratio": params["teacher"] / params["student"],
        "compression": job.compression,
        "generation": job.generation,
        "synthetic_agreement": {"best": after["token"], "before_finetune": job.before.get("token"),
                                "exact": after["exact"], "exact_before_finetune": job.before.get("exact")},
        "distill": None if r is None else {"objective": job.config.objective, "best_step": r.best_step,
                                           "best_score": r.best_score, "loss_curve": r.loss_curve,
                                           "score_curve": r.score_curve},
        "decode_speed": speed,
        "timings_s": job.timings,
        "versions": {"torch": torch.__version__, "safetensors": safetensors.__version__,
                     "python": platform.python_version()},
    }
    write_manifest(job.out, manifest)
    job.report("export", 1.0, "done", compression_ratio=manifest["compression_ratio"])
    log.info("sequence student: %.2fx, %.1f%% exact agreement", manifest["compression_ratio"], 100 * after["exact"])
    return json.loads((job.out / MANIFEST).read_text())


def export_program(student: nn.Module, tokens: SequenceSpec, path: Path) -> None:
    """A ``torch.export`` program of the student's forward pass on the CPU: ``tokens (B, T) -> (B, T, V)``,
    batch and length dynamic (T up to ``max_length``)."""
    model = student.cpu().eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    length = torch.export.Dim("length", min=1, max=tokens.max_length)
    example = torch.full((2, min(4, tokens.max_length)), tokens.bos_id, dtype=torch.long)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch, 1: length},))
    torch.export.save(program, str(path))


@torch.inference_mode()
def decode_speed(model: nn.Module, tokens: SequenceSpec, device: torch.device, *, batch: int = 64,
                 repeats: int = 3) -> dict[str, float]:
    """Greedy decoding of ``max_length`` tokens from BOS, EOS ignored (so teacher and student decode the same
    number of steps, whatever they generate), fastest of ``repeats``: sequences and tokens per second at batch
    1 and at ``batch``. With the model's key-value cache when it has one (as ``kegnet.sequence.generate``
    decodes), else re-running the prefix every step."""
    model.eval()
    cached = callable(getattr(model, "new_cache", None)) and callable(getattr(model, "step", None))
    out = {}
    for b in (1, batch):
        best = float("inf")
        for _ in range(repeats):
            nxt = torch.full((b, 1), tokens.bos_id, dtype=torch.long, device=device)
            seq, cache = nxt, model.new_cache(b, device=device) if cached else None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            while seq.shape[1] < tokens.max_length:
                logits = model.step(nxt, cache) if cached else model(seq)
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
        out[f"batch{b}_sequences_per_s"] = b / best
        out[f"batch{b}_tokens_per_s"] = b * (tokens.max_length - 1) / best
    return out


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def check_supported(eval_set: object) -> None:
    """What sequence jobs do not take, refused with what to do instead."""
    if eval_set is not None:
        raise KegnetError("eval_set is for classifiers (x, y); a sequence job reports agreement with the teacher "
                          "on its own generations")
