"""Fast-DFKD, re-implemented: Fang et al. 2022, "Up to 100× Faster Data-free Knowledge Distillation" (AAAI).

A meta-generator learns features common to all synthesis rounds: each round copies it, optimizes the copy
and a fresh latent batch for only a few steps (``G_STEPS``) against the teacher (BatchNorm statistics,
cross-entropy to target classes, and after a warm-up an adversarial term that seeks samples where the
student still agrees with the teacher but is far from it), then moves the meta-generator by the copy's
first-order gradients (first-order MAML, as the authors' ``is_maml`` setting). Each round's samples join a
memory bank; the student is distilled on random batches of the bank between rounds. Settings follow the
authors' CIFAR-10 "fast" script (BN 10, one-hot 0.4, adversarial 1.1, generator lr 2e-3, latent lr 0.01,
2 inner steps, latent 256, a fresh first layer each round, warm-up a tenth of training without the
adversarial term) except: ``KD_STEPS`` student steps per round instead of 400 (a CPU budget has tens of
rounds, not thousands), the student's optimizer (Adam 1e-3, as KegNet's fine-tuning), and a final
BatchNorm without affine instead of a sigmoid and the dataset's normalization (which a data-free method
does not know). Vectors get no jitter.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from bench.peers.common import Clock, PeerResult, check_batch, frozen, train_mode
from bench.peers.deepinversion import BatchNormGap, jitter
from kegnet.distill import kd_step  # the product's own KD step: peers are judged by the same loss

LATENT = 256
GENERATOR_LR, LATENT_LR = 2e-3, 0.01
G_STEPS = 2
BN_WEIGHT, ONE_HOT, ADVERSARIAL = 10.0, 0.4, 1.1
WARMUP_SHARE = 0.1
KD_STEPS = 10
STUDENT_LR = 1e-3
TEMPERATURE = 3.0
MAX_BANK = 100_000  # samples kept; the oldest go first


class ImageGenerator(nn.Module):
    """The authors' generator (DCGAN-like, ngf 64), ending in a BatchNorm without affine."""

    def __init__(self, shape: tuple[int, int, int], latent: int = LATENT, ngf: int = 64) -> None:
        super().__init__()
        self.shape, self.side, self.width = shape, max(1, -(-max(shape[1:]) // 4)), 2 * ngf
        self.l1 = nn.Linear(latent, self.width * self.side ** 2)
        self.blocks = nn.Sequential(
            nn.BatchNorm2d(self.width), nn.Upsample(scale_factor=2),
            nn.Conv2d(self.width, self.width, 3, 1, 1, bias=False), nn.BatchNorm2d(self.width), nn.LeakyReLU(0.2),
            nn.Upsample(size=shape[1:]),
            nn.Conv2d(self.width, ngf, 3, 1, 1, bias=False), nn.BatchNorm2d(ngf), nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, shape[0], 3, 1, 1), nn.BatchNorm2d(shape[0], affine=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.l1(z).view(-1, self.width, self.side, self.side))


class VectorGenerator(nn.Module):
    """For tabular teachers (the paper has none): an MLP with the same first layer and final BatchNorm."""

    def __init__(self, features: int, latent: int = LATENT, hidden: int = 256) -> None:
        super().__init__()
        self.l1 = nn.Linear(latent, hidden)
        self.blocks = nn.Sequential(nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                                    nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, features),
                                    nn.BatchNorm1d(features, affine=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.l1(z))


def make_generator(input_shape: tuple[int, ...]) -> nn.Module:
    if len(input_shape) == 3:
        return ImageGenerator((input_shape[0], input_shape[1], input_shape[2]))
    if len(input_shape) == 1:
        return VectorGenerator(input_shape[0])
    raise ValueError(f"Fast-DFKD here takes C×H×W images or flat vectors, got input shape {input_shape}")


def adversarial_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Minus the KL(teacher || student) on the samples where both still pick the same class."""
    kl = F.kl_div(F.log_softmax(student_logits, 1), F.softmax(teacher_logits, 1), reduction="none").sum(1)
    agree = (student_logits.argmax(1) == teacher_logits.argmax(1)).float()
    return -(kl * agree).mean()


def synthesize(meta: nn.Module, meta_opt: torch.optim.Optimizer, teacher: nn.Module, student: nn.Module,
               gap: BatchNormGap, shape: tuple[int, ...], num_classes: int, batch_size: int, adversarial: bool,
               rng: torch.Generator, device: torch.device) -> torch.Tensor:
    """One round: a fresh first layer and latent batch, ``G_STEPS`` steps on a copy, one meta step."""
    meta.l1.reset_parameters()
    fast = copy.deepcopy(meta).train()
    z = torch.randn(batch_size, LATENT, generator=rng).to(device).requires_grad_(True)
    targets = (torch.randperm(batch_size, generator=rng) % num_classes).to(device)
    opt = torch.optim.Adam([{"params": fast.parameters()}, {"params": [z], "lr": LATENT_LR}], lr=GENERATOR_LR,
                           betas=(0.5, 0.999))
    meta_opt.zero_grad(set_to_none=True)
    for _ in range(G_STEPS):
        x = fast(z)
        seen = jitter(x, rng) if len(shape) == 3 else x
        t_out = teacher(seen)
        loss = BN_WEIGHT * gap.pop() + ONE_HOT * F.cross_entropy(t_out, targets)
        if adversarial:
            loss = loss + ADVERSARIAL * adversarial_loss(student(seen), t_out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p, q in zip(meta.parameters(), fast.parameters(), strict=True):  # first-order MAML: accumulate
            if q.grad is not None:
                p.grad = q.grad.clone() if p.grad is None else p.grad + q.grad
        opt.step()
    meta_opt.step()
    gap.pop()
    with torch.no_grad():
        return fast(z).detach()


def train(teacher: nn.Module, student: nn.Module, input_shape: tuple[int, ...], seconds: float, *,
          batch_size: int, num_classes: int, device: torch.device, seed: int) -> PeerResult:
    """Alternate one synthesis round and ``KD_STEPS`` student steps on the memory bank until ``seconds``."""
    clock, batch_size = Clock(seconds), check_batch(batch_size)
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    teacher, shape = frozen(teacher).to(device), tuple(input_shape)
    meta = make_generator(shape).to(device)
    meta_opt = torch.optim.Adam(meta.parameters(), lr=GENERATOR_LR * G_STEPS, betas=(0.5, 0.999))
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=STUDENT_LR)
    bank: list[torch.Tensor] = []
    rounds = steps = 0
    train_mode(student.to(device))
    with BatchNormGap(teacher) as gap:
        while steps == 0 or not clock.spent():
            student.eval()  # the adversarial term reads the student as it is, dropout off
            bank.append(synthesize(meta, meta_opt, teacher, student, gap, shape, num_classes, batch_size,
                                   clock.spent(WARMUP_SHARE), rng, device))
            rounds += 1
            while sum(len(b) for b in bank) > MAX_BANK:
                bank.pop(0)
            data = torch.cat(bank)
            train_mode(student)
            for _ in range(KD_STEPS):
                if steps > 0 and clock.spent():
                    break
                x = data[torch.randint(len(data), (batch_size,), generator=rng)]
                x = jitter(x, rng) if len(shape) == 3 else x
                with torch.no_grad():
                    target = teacher(x)
                    gap.pop()  # the hooks measure every teacher call; only synthesis reads them
                kd_step(student, opt, x, target, TEMPERATURE)
                steps += 1
    student.eval()
    return PeerResult("fast-dfkd", {"rounds": rounds, "generator": rounds * G_STEPS, "student": steps},
                      clock.elapsed(), {"batch_size": batch_size, "g_steps": G_STEPS, "kd_steps": KD_STEPS,
                                        "bn_layers": gap.count, "temperature": TEMPERATURE})
