"""DeepInversion, re-implemented: Yin et al. 2020, "Dreaming to Distill: Data-free Knowledge Transfer via
DeepInversion" (CVPR).

Batches of inputs are optimized directly from Gaussian noise: cross-entropy of the teacher's outputs to
target classes (balanced over the classes), plus the distance of each BatchNorm layer's batch statistics
to its running statistics (``r_feature``: L2 norms of the mean and variance gaps, summed over layers),
plus image priors (total variation, L2). Images are jittered by up to 2 px each iteration. The student is
then distilled on the synthesized pool. Settings follow the authors' CIFAR-10 recipe (Adam lr 0.05,
``r_feature`` 10, TV 2.5e-5, L2 0) except the iterations per batch (2,000 there; ``ITERATIONS`` here, for
a CPU budget) and the student's optimizer (Adam 1e-3, as KegNet's own fine-tuning). Half the wall time goes
to synthesis, the rest to distillation. A teacher without BatchNorm (the tabular MLPs) gets cross-entropy
and the L2 prior only; vectors get no jitter and no TV.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.peers.common import Clock, PeerResult, check_batch, frozen, train_mode
from kegnet.distill import kd_step  # the product's own KD step: peers are judged by the same loss
from kegnet.models.taps import Hooks

LR = 0.05
BN_WEIGHT = 10.0
TV_WEIGHT = 2.5e-5
L2_WEIGHT = 0.0
VECTOR_L2_WEIGHT = 1e-3  # without BatchNorm or TV the inputs are otherwise unbounded
JITTER = 2
ITERATIONS = 200
SYNTHESIS_SHARE = 0.5
STUDENT_LR = 1e-3
TEMPERATURE = 3.0


class BatchNormGap(Hooks):
    """Each BatchNorm layer's batch mean and variance against its running ones: ``pop()`` is the sum over
    layers of ||mean - running_mean||_2 + ||var - running_var||_2 for the last forward pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.terms: list[torch.Tensor] = []
        layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                  and m.running_mean is not None]
        self.count = len(layers)
        self._handles = [m.register_forward_pre_hook(self._measure) for m in layers]

    def _measure(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].transpose(0, 1).reshape(inputs[0].shape[1], -1)  # (C, N × spatial)
        self.terms.append(torch.norm(x.mean(1) - module.running_mean, 2)
                          + torch.norm(x.var(1, unbiased=False) - module.running_var, 2))

    def pop(self) -> torch.Tensor:
        total = torch.stack(self.terms).sum() if self.terms else torch.zeros(())
        self.terms = []
        return total


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """The authors' L2 total variation: norms of the differences to the right, down and both diagonals."""
    return (torch.norm(x[:, :, :, :-1] - x[:, :, :, 1:]) + torch.norm(x[:, :, :-1, :] - x[:, :, 1:, :])
            + torch.norm(x[:, :, 1:, :-1] - x[:, :, :-1, 1:]) + torch.norm(x[:, :, :-1, :-1] - x[:, :, 1:, 1:]))


def jitter(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """A random roll of up to ``JITTER`` pixels along each image axis (the same for the whole batch)."""
    dx, dy = (int(v) for v in torch.randint(-JITTER, JITTER + 1, (2,), generator=rng))
    return torch.roll(x, shifts=(dx, dy), dims=(2, 3))


def synthesize(teacher: nn.Module, gap: BatchNormGap, shape: tuple[int, ...], num_classes: int, batch_size: int,
               clock: Clock, share: float, rng: torch.Generator, device: torch.device) -> tuple[torch.Tensor, int]:
    """One batch optimized for ``ITERATIONS`` steps, or until ``share`` of the clock has passed; returns the
    batch and the iterations it got."""
    image = len(shape) == 3
    targets = torch.randperm(batch_size, generator=rng)[:batch_size] % num_classes
    targets = targets.to(device)
    x = torch.randn(batch_size, *shape, generator=rng).to(device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=LR)
    done = 0
    while done < ITERATIONS and (done == 0 or not clock.spent(share)):
        seen = jitter(x, rng) if image else x
        loss = F.cross_entropy(teacher(seen), targets) + BN_WEIGHT * gap.pop()
        if image:
            loss = loss + TV_WEIGHT * total_variation(seen) + L2_WEIGHT * torch.norm(seen, 2)
        else:
            loss = loss + VECTOR_L2_WEIGHT * seen.pow(2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += 1
    gap.pop()  # nothing may carry over into the next batch
    return x.detach(), done


def train(teacher: nn.Module, student: nn.Module, input_shape: tuple[int, ...], seconds: float, *,
          batch_size: int, num_classes: int, device: torch.device, seed: int) -> PeerResult:
    """Synthesize batches for ``SYNTHESIS_SHARE`` of ``seconds``, then distill ``student`` in place on
    random minibatches of the pool (jittered images) until the time is spent."""
    clock, batch_size = Clock(seconds), check_batch(batch_size)
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    teacher = frozen(teacher).to(device)
    shape, pool, iterations = tuple(input_shape), [], 0
    with BatchNormGap(teacher) as gap:
        while not pool or not clock.spent(SYNTHESIS_SHARE):  # at least one batch, however short the time
            batch, done = synthesize(teacher, gap, shape, num_classes, batch_size, clock, SYNTHESIS_SHARE, rng,
                                     device)
            pool.append(batch)
            iterations += done
    data = torch.cat(pool)
    train_mode(student.to(device))
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=STUDENT_LR)
    steps = 0
    while steps == 0 or not clock.spent():  # at least one step, however short the time
        x = data[torch.randint(len(data), (batch_size,), generator=rng)]
        if len(shape) == 3:
            x = jitter(x, rng)
        with torch.no_grad():
            target = teacher(x)
        kd_step(student, opt, x, target, TEMPERATURE)
        steps += 1
    student.eval()
    return PeerResult("deepinversion", {"batches": len(pool), "pool": len(data), "iterations": iterations,
                                        "student": steps}, clock.elapsed(),
                      {"batch_size": batch_size, "iterations_per_batch": ITERATIONS, "bn_weight": BN_WEIGHT,
                       "bn_layers": gap.count, "temperature": TEMPERATURE})
