"""Training the KegNet generator ensemble against a frozen teacher.

All generators are trained together: each makes its own batch, the teacher classifies the concatenation
in one call, and the per-generator losses are summed. The generators share no parameters, so one Adam
over all of them gives each exactly the update it would get alone, at a fraction of the launches.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kegnet.config import GeneratorConfig
from kegnet.errors import Cancelled
from kegnet.generation.codes import sample_labels
from kegnet.generation.losses import decoder_loss, diversity_loss, smoothness_loss
from kegnet.generation.models import Decoder, make_generator
from kegnet.models.taps import BatchNormStatistics, PenultimateTap, batchnorm_layers, ensemble_members

log = logging.getLogger(__name__)

StepCallback = Callable[[int, dict[str, float]], None]

# Input elements of all generators' batches together above which each generator gets its own teacher call
# (5 × 256 × 3×224×224 is 193 M; 5 × 256 × 1×32×32 is 1.3 M).
CONCAT_LIMIT = 32 * 1024 * 1024


def freeze(teacher: nn.Module, mode: str) -> nn.Module:
    """A frozen copy of the teacher: no gradient into its weights, in eval or train (batch-stat) mode.

    The copy matters in train mode: BatchNorm would otherwise overwrite the user's running statistics.
    """
    frozen = copy.deepcopy(teacher)
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen.train(mode == "train")


def train_generators(
    teacher: nn.Module, input_shape: tuple[int, ...], num_classes: int, config: GeneratorConfig, *,
    device: torch.device, seed: int, on_step: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None, report_every: int = 50,
) -> list[nn.Module]:
    """Train ``config.num_generators`` generators; returns them in eval mode.

    ``teacher`` may be a ``kegnet.distill.ensemble.TeacherEnsemble``: the generators then learn samples of
    the asked class for the ensemble's mixture, and the activation reward averages over its members.

    ``on_step(step, metrics)`` is called every ``report_every`` steps with the mean losses and the teacher's
    accuracy on the generators' labels since the last report.
    """
    frozen = freeze(teacher, config.teacher_mode).to(device)
    activation, features, statistics = _priors(frozen, config, input_shape)
    k = config.num_generators
    gens, decs = [], []
    for i in range(k):
        torch.manual_seed(seed * 1000 + i)  # a different seed per generator, as in the paper
        gens.append(make_generator(input_shape, num_classes, config.noise_dim).to(device).train())
        decs.append(Decoder(math.prod(input_shape), config.noise_dim, config.decoder_layers).to(device).train())
    params = [p for m in gens + decs for p in m.parameters()]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    rng = torch.Generator(device=device).manual_seed(seed)
    b = config.batch_size

    # All generators share one teacher call per step, unless their concatenated batch is large (224×224
    # images): then each generator gets its own call and the gradients accumulate before the one step,
    # which gives the same update (eval-mode teacher) at a fifth of the peak memory.
    groups = ([[i] for i in range(k)] if b * k * math.prod(input_shape) > CONCAT_LIMIT
              else [list(range(k))])

    def group_loss(group: list[int], labels: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Loss of the generators in ``group`` (summed over them) and its parts, for one teacher call."""
        n = len(group)
        rows = [slice(i * b, (i + 1) * b) for i in group]
        samples = [gens[i](labels[r], noise[r]) for i, r in zip(group, rows, strict=True)]
        if statistics is not None:
            statistics.groups = n  # per-generator batch statistics
        logits = frozen(torch.cat(samples))
        target = torch.cat([labels[r] for r in rows]).argmax(1)
        l_cls = F.cross_entropy(logits, target) * n  # mean per generator, summed over generators
        l_dec = sum(decoder_loss(decs[i](s), noise[r]) for i, s, r in zip(group, samples, rows, strict=True))
        l_div = (sum(diversity_loss(s, noise[r]) for s, r in zip(samples, rows, strict=True))
                 if config.beta > 0 else torch.zeros((), device=device))
        loss = l_cls + config.alpha * l_dec + config.beta * l_div
        if config.smoothness > 0 and len(input_shape) == 3:
            loss = loss + config.smoothness * sum(smoothness_loss(s) for s in samples)
        if statistics is not None:
            loss = loss + config.batchnorm_prior * statistics.pop() * n
        if features is not None:
            # DAFL's activation loss (Chen et al. 2019): real inputs excite the teacher's features strongly.
            strength = torch.stack([tap.value.abs().mean() for tap in features]).mean()
            loss = loss - activation * strength * n
        correct = (logits.argmax(1) == target).float().sum()
        return loss, l_cls.detach(), l_dec.detach(), l_div.detach(), correct.detach()

    # Running sums stay on the device; reading them only at report time avoids a host sync per step.
    sums = torch.zeros(4, device=device)
    for step in range(1, config.steps + 1):
        labels = sample_labels(b * k, num_classes, rng, device)
        noise = torch.randn(b * k, config.noise_dim, generator=rng, device=device)
        optimizer.zero_grad(set_to_none=True)
        parts = torch.zeros(4, device=device)
        for group in groups:
            loss, *group_parts = group_loss(group, labels, noise)
            loss.backward()
            parts += torch.stack(group_parts)
        optimizer.step()
        if should_cancel and should_cancel():  # every step: a step of a large model can take seconds
            raise Cancelled("cancelled while training generators")

        sums += parts / torch.tensor([k, k, k, b * k], device=device)  # per generator; accuracy per sample
        if step % report_every == 0 or step == config.steps:
            n = report_every if step % report_every == 0 else step % report_every
            cls_, dec_, div_, acc_ = (sums / n).tolist()
            sums.zero_()
            if on_step:
                on_step(step, {"cls_loss": cls_, "dec_loss": dec_, "div_loss": div_, "teacher_acc": acc_})
    return [g.eval() for g in gens]


def _priors(frozen: nn.Module, config: GeneratorConfig, input_shape: tuple[int, ...]
            ) -> tuple[float, list[PenultimateTap] | None, BatchNormStatistics | None]:
    """What the generators are rewarded for besides the class: the weight of DAFL's activation reward and the
    taps it reads (one per teacher: with an ensemble, every member's features), and the teacher's BatchNorm
    statistics to match (None where off or where the teacher has none)."""
    activation = config.activation if config.activation is not None else (0.1 if len(input_shape) == 3 else 0.0)
    features = None
    if activation > 0:
        try:
            features = [PenultimateTap(m) for m in ensemble_members(frozen)]
        except ValueError:  # no nn.Linear head (an ONNX graph ending in MatMul): nothing to reward
            log.info("the teacher has no nn.Linear head: the activation reward is off")
    statistics = BatchNormStatistics(frozen, config.num_generators) if batchnorm_prior_applies(frozen, config) else None
    return activation, features, statistics


def batchnorm_prior_applies(teacher: nn.Module, config: GeneratorConfig) -> bool:
    """Whether the generators match ``teacher``'s BatchNorm running statistics: the prior is on, the teacher
    runs in eval mode (train mode uses batch statistics) and it has BatchNorm layers with running statistics."""
    return config.batchnorm_prior > 0 and config.teacher_mode == "eval" and bool(batchnorm_layers(teacher))
