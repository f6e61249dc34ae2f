"""What a job will cost, estimated from its spec and config before it is queued.

Every config field is bounded on its own (kegnet.config), but not their product: a 2.5 KB teacher on a
16×512×512 input with 16 generators × batch 2,048 × 200,000 steps passes every field's bound while one
generator batch alone is 32 GiB. ``estimate_cost`` gives the job's peak memory and its compute so that a
service can refuse such a job (``check_cost``) with a message naming the knob to lower.

The estimate is an order of magnitude for float32 training, not a measurement. Notation (per sample):
``D`` input elements; ``A`` activation elements of one teacher forward (the outputs of all its leaf
modules), ``M`` its multiply-accumulates (MACs), ``P`` its parameters; ``A_g``, ``M_g``, ``P_g`` the same for
one KegNet generator (the decoder reading the sample adds ``120·D`` MACs and parameters); ``T`` teachers;
``k``, ``b``, ``s_g`` generators, generator batch and steps; ``B``, ``s_d`` distillation batch and steps;
``H`` held-out samples; ``F`` = 4 bytes.

Peak memory (bytes) = F·T·P (the teachers) + the larger stage:

- generators (method ``kegnet``), ``n`` samples per teacher call (``b·k``, or ``b`` when ``b·k·D`` is over
  the trainer's concatenation limit):
  ``F·[n·(2·T·A + 2·(A_g + D)) + 4·k·(P_g + 120·D)]`` — the teachers' activations kept for the backward
  pass and their gradients, the generators' own, and generator and decoder weights with gradients and
  Adam's two moments.
- distillation (any method but ``tucker-only``, ``s_d > 0``):
  ``F·[B·((T + 2)·A + A_g + D) + H·D + X·D + 4·P]`` — the teachers' forward passes, the student's
  activations and gradients (the student is at most the teacher), the held-out samples, a fixed transfer set
  of ``X = k·samples_per_generator`` samples (``transfer="fixed"``), and the student with gradients and Adam.

Compute (MACs) = ``s_g·k·b·3·(T·M + M_g + 120·D)`` (forward and backward through teachers, generator and
decoder) + ``s_d·B·(T·M·m + 3·M + M_g)`` (teachers forward, ``m`` MC-dropout passes with that weighting;
student forward and backward; generator forward) + ``s_d·B·3·(T·M + M_g)·share`` when the generators keep
learning adversarially while the student does. With ``R`` candidate recipes (``distill.recipes``) the
distillation compute is ``R`` times that, and ``R - 1`` more students (``4·P`` each, weights only) are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kegnet.config import ClassifierConfig, SequenceJobConfig
from kegnet.errors import SpecError
from kegnet.metrics import forward_with_hooks

FLOAT_BYTES = 4
DECODER_UNITS = 120
GIB = 1024 ** 3


@dataclass(frozen=True)
class Profile:
    """One forward pass of a model on one sample: parameters, MACs and activation elements."""

    parameters: int
    macs: int
    activations: int


@dataclass(frozen=True)
class Knobs:
    """A task's two costly stages (making samples, distilling) and the config fields that lower each one's
    memory and compute, named in refusals."""

    sample_stage: str
    sample_memory: str
    sample_compute: str
    distill_memory: str
    distill_compute: str
    distill_stage: str = "distillation"


CLASSIFIER_KNOBS = Knobs(
    "generator training", "config.generator.batch_size (or num_generators, or a smaller input_shape)",
    "config.generator.steps, num_generators or batch_size",
    "config.distill.batch_size (or holdout_samples, samples_per_generator with transfer 'fixed', or a smaller "
    "input_shape)", "config.distill.steps or batch_size")
SEQUENCE_KNOBS = Knobs(
    "the teacher's generations", "config.sequence.generation_batch (or a smaller sequence.max_length)",
    "config.sequence.samples, holdout or beam_size (or a smaller sequence.max_length)",
    "config.sequence.batch_size (or a smaller sequence.max_length)", "config.sequence.steps or batch_size")


@dataclass(frozen=True)
class JobCost:
    """Estimated peak memory (bytes) and compute (MACs) of a job, with each stage's share: the "generator"
    stage makes the samples (a sequence model's: the teacher's own generations), ``knobs`` name what lowers
    each."""

    memory_bytes: int
    macs: int
    generator_memory_bytes: int
    distill_memory_bytes: int
    generator_macs: int
    distill_macs: int
    knobs: Knobs = CLASSIFIER_KNOBS

    def describe(self) -> str:
        return f"about {self.memory_bytes / GIB:.1f} GiB of memory and {self.macs:.2e} MACs"


class Profiled(nn.Module):
    """A stand-in for a teacher known only by its profile (an ONNX graph read statically, never converted):
    ``profile_model`` returns the profile, so a task's cost formula prices it like a built model."""

    def __init__(self, profile: Profile) -> None:
        super().__init__()
        self.profile = profile


def profile_model(model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Profile:
    """Parameters, MACs and activation elements of one forward pass on one sample of ``input_shape``.

    MACs: all the work torch's ``FlopCounterMode`` counts (matmul, bmm, baddbmm, addmm, convolutions,
    scaled dot-product attention: ``flops / 2``), so attention is priced, not only the Linear and Conv layers.
    Activations: the output elements of every leaf module. Built on the meta device (``torch.device("meta")``)
    the model costs nothing to profile: shapes flow, nothing is allocated. A sequence model:
    ``input_shape=(L,)``, ``dtype=torch.long`` (one sequence of ``L`` tokens).
    """
    if isinstance(model, Profiled):
        return model.profile
    activations = 0

    def hook(module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        nonlocal activations
        outs = output if isinstance(output, tuple | list) else (output,)
        activations += sum(o.numel() for o in outs if isinstance(o, torch.Tensor))

    leaves = [m for m in model.modules() if not list(m.children())]
    with FlopCounterMode(display=False) as counter:
        forward_with_hooks(model, input_shape, hook, leaves, dtype)
    return Profile(sum(p.numel() for p in model.parameters()), int(counter.get_total_flops()) // 2,
                   int(activations))


def generator_profile(input_shape: tuple[int, ...], num_classes: int, noise_dim: int) -> Profile:
    """A KegNet generator's profile, built on the meta device (nothing is allocated)."""
    from kegnet.generation.models import make_generator

    with torch.device("meta"):
        gen = make_generator(input_shape, num_classes, noise_dim)
    params = sum(p.numel() for p in gen.parameters())
    macs = activations = 0

    def hook(module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        nonlocal macs, activations
        if isinstance(output, torch.Tensor):
            activations += output.numel()
            if isinstance(module, nn.Conv2d):
                macs += output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
            elif isinstance(module, nn.ConvTranspose2d) and isinstance(inputs[0], torch.Tensor):
                macs += inputs[0].numel() * (module.out_channels // module.groups) * math.prod(module.kernel_size)
            elif isinstance(module, nn.Linear):
                macs += module.in_features * module.out_features * (output.numel() // module.out_features)

    handles = [m.register_forward_hook(hook) for m in gen.modules() if not list(m.children())]
    gen.eval()
    try:
        with torch.no_grad():
            gen(torch.zeros(2, num_classes, device="meta"), torch.zeros(2, noise_dim, device="meta"))
    finally:
        for h in handles:
            h.remove()
    # The hooks saw a batch of 2 (BatchNorm1d needs it in training; harmless here): per sample is half.
    return Profile(params, macs // 2, activations // 2)


def estimate_cost(teacher: Profile, input_shape: tuple[int, ...], num_classes: int, config: ClassifierConfig,
                  teachers: int = 1) -> JobCost:
    """The module docstring's formula for ``config`` on ``teachers`` teachers profiled as ``teacher``."""
    from kegnet.generation.train import CONCAT_LIMIT

    d = math.prod(input_shape)
    g, dc = config.generator, config.distill
    t, a, m, p = teachers, teacher.activations, teacher.macs, teacher.parameters
    uses_generators = config.method == "kegnet"
    gen = (generator_profile(input_shape, num_classes, g.noise_dim) if uses_generators
           else Profile(0, 0, 0))
    decoder = DECODER_UNITS * d if uses_generators else 0

    gen_mem = gen_macs = 0
    if uses_generators:
        k, b = g.num_generators, g.batch_size
        n = b if b * k * d > CONCAT_LIMIT else b * k
        gen_mem = FLOAT_BYTES * (n * (2 * t * a + 2 * (gen.activations + d)) + 4 * k * (gen.parameters + decoder))
        gen_macs = g.steps * k * b * 3 * (t * m + gen.macs + decoder)

    dist_mem = dist_macs = 0
    if config.method != "tucker-only" and dc.steps > 0:
        fixed = g.num_generators * dc.samples_per_generator if dc.transfer == "fixed" else 0
        dist_mem = FLOAT_BYTES * (dc.batch_size * ((t + 2) * a + gen.activations + d) + dc.holdout_samples * d
                                  + fixed * d + 4 * p)
        passes = dc.mc_dropout_passes if t > 1 and dc.ensemble_weighting == "mc_dropout" else 1
        dist_macs = dc.steps * dc.batch_size * (t * m * passes + 3 * m + gen.macs)
        if uses_generators and dc.adversarial_weight > 0 and dc.transfer == "fresh":
            dist_macs += int(dc.steps * dc.batch_size * 3 * (t * m + gen.macs) * dc.adversarial_share)
        # One student per candidate recipe, each kept (its weights) until the exam has chosen.
        recipes = max(1, len(config.candidate_recipes(len(input_shape) == 3, num_classes)))
        dist_macs *= recipes
        dist_mem += FLOAT_BYTES * (recipes - 1) * p

    # compression.fit = outputs or auto holds its samples while it refits the layers (between the two stages above).
    fit_mem = FLOAT_BYTES * config.compression.fit_samples * d if config.compression.fit != "weights" else 0
    memory = FLOAT_BYTES * t * p + max(gen_mem, dist_mem, fit_mem)
    return JobCost(memory_bytes=int(memory), macs=int(gen_macs + dist_macs), generator_memory_bytes=int(gen_mem),
                   distill_memory_bytes=int(dist_mem), generator_macs=int(gen_macs), distill_macs=int(dist_macs))


def estimate_sequence_cost(teacher: Profile, max_length: int, vocab_size: int, config: SequenceJobConfig) -> JobCost:
    """A sequence job's cost, for a teacher profiled on one full sequence of ``L = max_length`` tokens
    (``M``, ``A``, ``P``: its MACs, activation elements and parameters; ``V`` the vocabulary).

    Decoding reuses a key-value cache (kegnet.sequence.generate): a sequence of ``L`` tokens costs about one
    forward pass of the full sequence, ``M``. The teacher samples
    ``N + H`` sequences (transfer set and held-out) and completes them by beam search (``K`` beams); every
    evaluation decodes the ``H`` held-out prompts greedily with the student. A distillation step runs the
    teacher forward and the student forward and backward on ``B`` sequences, twice for ``both``.
    Memory: the teacher, plus the larger of ``generation_batch`` rows' activations and logits, or the
    distillation batch's (teacher and student activations, student gradients, three ``B·L·V`` logit
    tensors) with the student's weights, gradients and Adam state.
    """
    sc = config.sequence
    m, a, p, ell = teacher.macs, teacher.activations, teacher.parameters, max_length
    decode = m
    n, h, k = sc.samples, sc.holdout, sc.beam_size
    evaluations = sc.steps // sc.eval_every + 1 if sc.steps else 0
    gen_macs = (n + h) * (1 + k) * decode + evaluations * h * decode
    batches = 2 if sc.objective == "both" else 1
    dist_macs = sc.steps * sc.batch_size * 4 * m * batches
    gen_mem = FLOAT_BYTES * sc.generation_batch * (a + ell * vocab_size)
    dist_mem = FLOAT_BYTES * (sc.batch_size * (3 * a + 3 * ell * vocab_size) + 4 * p)
    memory = FLOAT_BYTES * p + max(gen_mem, dist_mem)
    return JobCost(memory_bytes=int(memory), macs=int(gen_macs + dist_macs), generator_memory_bytes=int(gen_mem),
                   distill_memory_bytes=int(dist_mem), generator_macs=int(gen_macs), distill_macs=int(dist_macs),
                   knobs=SEQUENCE_KNOBS)


def check_cost(cost: JobCost, *, max_memory_bytes: int, max_macs: int) -> None:
    """Raise ``SpecError`` naming the stage and the knobs to lower when ``cost`` is over either limit."""
    k = cost.knobs
    if cost.memory_bytes > max_memory_bytes:
        samples = cost.generator_memory_bytes >= cost.distill_memory_bytes
        stage, knobs = (k.sample_stage, k.sample_memory) if samples else (k.distill_stage, k.distill_memory)
        raise SpecError(f"this job would need about {cost.memory_bytes / GIB:.1f} GiB of memory in {stage}, "
                        f"above this service's limit of {max_memory_bytes / GIB:.1f} GiB; lower {knobs}")
    if cost.macs > max_macs:
        samples = cost.generator_macs >= cost.distill_macs
        stage, knobs = (k.sample_stage, k.sample_compute) if samples else (k.distill_stage, k.distill_compute)
        raise SpecError(f"this job would need about {cost.macs:.2e} multiply-accumulates, mostly in {stage}, "
                        f"above this service's limit of {max_macs:.2e}; lower {knobs}")
