"""A common synthetic exam: how students trained from different sample recipes are compared without data.

Agreement measured on each recipe's own samples is not comparable across recipes: a student trained on
Gaussian noise agrees with the teacher on noise, one trained on class mixes agrees on mixes. The exam is one
fixed set drawn in equal shares from every source a job can train on (the generators asked for each class-code
scheme, including plain one-hot samples, and both noise baselines), with its own seed, never trained on. Every
candidate and every evaluation step is graded on it: agreement (same top class as the teacher) and KL from the
teacher's to the student's softmax. Classes are the teacher's predictions on the exam.

Shapes: ``Exam.x`` ``(N, *input_shape)``, ``Exam.teacher_logits`` ``(N, C)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kegnet.generation.codes import CODE_SCHEMES
from kegnet.generation.samplers import KegNetSampler, NoiseSampler, Sampler

# Within this agreement of the best, candidates are ranked by KL instead (a few exam samples apart is noise).
TIE = 0.005
# How candidates are compared: the mean per-class agreement. Plain agreement rewards a student that gets the
# exam's commonest class right (noise samples mostly land in one or two classes of the teacher); on the
# robustness suite the balanced score lost less against the real-data best (docs/benchmarks.md).
CRITERION = "balanced"


@dataclass
class Exam:
    x: torch.Tensor
    teacher_logits: torch.Tensor
    sources: dict[str, int]  # samples per source, in the order of x

    @property
    def teacher_classes(self) -> torch.Tensor:
        return self.teacher_logits.argmax(1)


@dataclass
class Grade:
    agreement: float
    kl: float
    per_class: dict[int, tuple[float, int]] = field(default_factory=dict)  # class -> (agreement, samples)
    per_source: dict[str, float] = field(default_factory=dict)  # source -> agreement
    kl_median: float | None = None  # the median over samples of KL(teacher || student)

    @property
    def balanced(self) -> float:
        """Mean of the per-class agreements: a student that only gets the exam's commonest class right
        scores low here even when plain agreement is high."""
        return sum(a for a, _ in self.per_class.values()) / len(self.per_class) if self.per_class else self.agreement

    def to_dict(self) -> dict:
        return {"agreement": self.agreement, "balanced": self.balanced, "kl": self.kl, "kl_median": self.kl_median,
                "per_class": {str(c): {"agreement": a, "samples": n} for c, (a, n) in self.per_class.items()},
                "per_source": self.per_source}


def exam_sources(kegnet: KegNetSampler | None, input_shape: tuple[int, ...],
                 device: torch.device) -> dict[str, Sampler]:
    """Every source a job can train on: each code scheme of the generators (if any), Gaussian, uniform."""
    sources: dict[str, Sampler] = {}
    if kegnet is not None:
        sources.update({f"kegnet/{scheme}": kegnet.with_codes(scheme) for scheme in CODE_SCHEMES})
    sources["gaussian"] = NoiseSampler("gaussian", input_shape, device)
    sources["uniform"] = NoiseSampler("uniform", input_shape, device)
    return sources


def generator_part(exam: Exam) -> Exam:
    """The exam's generator samples only (sources ``kegnet/*``), or ``exam`` itself when it has none.

    A second reading of a model's exam (``python -m bench.int8`` prints both): the noise samples alone can
    move a grade that says little about data-like inputs.
    """
    keep = torch.cat([torch.full((n,), name.startswith("kegnet/")) for name, n in exam.sources.items()])
    return exam if bool(keep.all()) or not bool(keep.any()) else _subset(exam, keep.to(exam.x.device))


def confident_part(exam: Exam, threshold: float = 0.9) -> Exam:
    """The exam's samples the teacher gives one class at least ``threshold`` of its probability (of every
    source), or ``exam`` itself when there are none.

    Generators asked for class mixes make samples on the teacher's decision boundaries, where any small change
    of the model (int8 rounding) flips the class; real inputs of a good teacher mostly lie far from them.
    """
    keep = exam.teacher_logits.softmax(1).amax(1) >= threshold
    return _subset(exam, keep) if bool(keep.any()) else exam


# The samples the teacher is sure of (``sure_part``): it gives one class this much probability. Fewer than
# MIN_SURE_SAMPLES of them are too few for one flip not to decide alone.
SURE = 0.9
MIN_SURE_SAMPLES = 16


def sure_part(exam: Exam) -> Exam | None:
    """The exam's samples the teacher gives one class at least ``SURE`` of its probability, or None where fewer
    than ``MIN_SURE_SAMPLES`` are.

    A second reading for decisions the whole exam misjudges because most of its samples sit on decision
    boundaries: whether an int8 model is kept (kegnet.compression.quantize) and whether fine-tuning retries at a
    lower rate (kegnet.distill.train).
    """
    sure = confident_part(exam, SURE)
    return None if sure is exam or len(sure.x) < MIN_SURE_SAMPLES else sure


def _subset(exam: Exam, keep: torch.Tensor) -> Exam:
    """The samples of ``exam`` where the boolean mask ``keep`` (N,) is true, in order, with their sources
    counted again (a source left with none is dropped)."""
    sources, start = {}, 0
    for name, n in exam.sources.items():
        if (kept := int(keep[start:start + n].sum())) > 0:
            sources[name] = kept
        start += n
    return Exam(exam.x[keep], exam.teacher_logits[keep], sources)


@torch.no_grad()
def build_exam(teacher: nn.Module, sources: dict[str, Sampler], n: int, seed: int, device: torch.device,
               chunk: int = 1024) -> Exam:
    """``n`` samples in equal shares from ``sources``, labelled by ``teacher``'s logits."""
    rng = torch.Generator(device=device).manual_seed(seed)
    per = math.ceil(n / len(sources))
    xs, counts = [], {}
    for name, sampler in sources.items():
        xs.append(sampler.sample_many(per, rng, chunk)[0])
        counts[name] = per
    x = torch.cat(xs)
    teacher.eval()
    logits = torch.cat([teacher(c) for c in x.split(chunk)])
    return Exam(x, logits, counts)


@torch.no_grad()
def grade(student: nn.Module, exam: Exam, chunk: int = 1024) -> Grade:
    """The student's agreement with the teacher and KL(teacher || student) (its mean and median over samples),
    overall, per teacher class and per source."""
    was_training = student.training
    student.eval()
    s_logits = torch.cat([student(c) for c in exam.x.split(chunk)])
    student.train(was_training)
    t_classes = exam.teacher_classes
    same = (s_logits.argmax(1) == t_classes).float()
    log_s, log_t = F.log_softmax(s_logits.float(), 1), F.log_softmax(exam.teacher_logits.float(), 1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean").item()
    kl_median = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(1).median().item()
    per_class = {}
    counts = torch.bincount(t_classes, minlength=exam.teacher_logits.shape[1])
    hits = torch.bincount(t_classes, weights=same, minlength=exam.teacher_logits.shape[1])
    for c in range(len(counts)):
        if counts[c] > 0:
            per_class[c] = (hits[c].item() / counts[c].item(), int(counts[c].item()))
    per_source, start = {}, 0
    for name, n in exam.sources.items():
        per_source[name] = same[start:start + n].mean().item()
        start += n
    return Grade(same.mean().item(), kl, per_class, per_source, kl_median)


def agreement_on(student: nn.Module, exam: Exam, chunk: int = 1024) -> float:
    """Just the overall agreement (cheaper than ``grade``: used at every evaluation step)."""
    with torch.no_grad():
        was_training = student.training
        student.eval()
        s = torch.cat([student(c).argmax(1) for c in exam.x.split(chunk)])
        student.train(was_training)
    return (s == exam.teacher_classes).float().mean().item()


def choose(grades: dict[str, Grade], by: str = CRITERION, tie: float = TIE) -> str:
    """The candidate with the best exam score ``by`` (``agreement``, ``balanced``: the mean per-class
    agreement, ``kl``: the lowest mean KL, or ``kl_median``: the lowest median KL over samples, the mean where
    a grade has none); among agreement-like scores within ``tie`` of the best, the lowest KL."""
    if by == "kl":
        return min(grades, key=lambda name: grades[name].kl)
    if by == "kl_median":
        return min(grades, key=lambda name: (grades[name].kl if grades[name].kl_median is None
                                              else grades[name].kl_median))
    score = {name: (g.balanced if by == "balanced" else g.agreement) for name, g in grades.items()}
    best = max(score.values())
    close = [name for name in grades if score[name] >= best - tie]
    return min(close, key=lambda name: grades[name].kl)
