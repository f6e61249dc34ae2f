"""Keep the KegNet generators learning while the student trains: toward samples the student gets wrong.

Generators trained only against the teacher settle on samples the teacher finds easy, and a student that
matches the teacher there learns little about the rest of the input space. Here, once per student step,
each generator takes one step on

    L = CE(teacher(G(y, z)), y) + beta * L_div - weight * KL_T(teacher || student)(G(y, z))

so it keeps making samples of the asked class (first term) but moves toward where the student disagrees with
the teacher (the adversarial term of data-free distillation, Fang et al. 2019 "DFAD", Micaelli & Storkey
2019), while staying diverse. The student then learns on fresh samples from the moved generators.
No real data is involved: this uses only the teacher, the student and the generators.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from kegnet.distill.losses import kd_loss
from kegnet.generation.codes import sample_labels
from kegnet.generation.losses import diversity_loss
from kegnet.generation.samplers import KegNetSampler, Sampler


class GeneratorAdversary(Sampler):
    """Owns copies of a sampler's generators (the caller's are never changed) and updates them.

    As a ``Sampler`` it draws ``share`` of each batch from the moving copies and the rest from the original
    generators: the original samples anchor the student where the teacher is sure, so the min-max game
    cannot drag it away from them (with the copies alone it did, measured on MNIST 4.10x).
    """

    def __init__(self, source: KegNetSampler, teacher: nn.Module, *, weight: float, beta: float, lr: float,
                 batch_size: int, temperature: float, share: float = 0.5) -> None:
        generators = [copy.deepcopy(g).eval() for g in source.generators]  # eval: BatchNorm running stats
        for g in generators:
            g.requires_grad_(True)
        self.source, self.share = source, share
        self.sampler = KegNetSampler(generators, source.num_classes, source.noise_dim, source.device,
                                     source.codes)
        self.teacher = teacher
        self.weight, self.beta, self.temperature = weight, beta, temperature
        self.per_generator = max(2, batch_size // len(generators))
        self.optimizer = torch.optim.Adam([p for g in generators for p in g.parameters()], lr=lr)

    def step(self, student: nn.Module, rng: torch.Generator) -> torch.Tensor:
        """One update of every generator against ``student``; returns the mean disagreement (detached)."""
        s = self.sampler
        b, k = self.per_generator, len(s.generators)
        labels = sample_labels(b * k, s.num_classes, rng, s.device)
        noise = torch.randn(b * k, s.noise_dim, generator=rng, device=s.device)
        samples = [g(labels[i * b:(i + 1) * b], noise[i * b:(i + 1) * b]) for i, g in enumerate(s.generators)]
        x = torch.cat(samples)
        t_logits = self.teacher(x)
        s_logits = student(x)
        disagreement = kd_loss(s_logits, t_logits, self.temperature)
        loss = F.cross_entropy(t_logits, labels.argmax(1)) * k - self.weight * disagreement * k
        if self.beta > 0:
            loss = loss + self.beta * sum(diversity_loss(smp, noise[i * b:(i + 1) * b])
                                          for i, smp in enumerate(samples))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=list(self.optimizer.param_groups[0]["params"]))  # no gradient into the student
        self.optimizer.step()
        return disagreement.detach()

    def sample(self, n: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        moved = round(n * self.share)
        x_new, y_new = self.sampler.sample(moved, rng) if moved else (None, None)
        if moved == n:
            return x_new, y_new
        x_old, y_old = self.source.sample(n - moved, rng)
        if not moved:
            return x_old, y_old
        return torch.cat([x_new, x_old]), torch.cat([y_new, y_old])
