"""DAFL, re-implemented: Chen et al. 2019, "Data-Free Learning of Student Networks" (ICCV).

A generator is trained against the frozen teacher with three losses: one-hot (cross-entropy of the
teacher's outputs to their own argmax, so samples are classified confidently), activation (minus the L1
norm of the teacher's penultimate features, so samples excite the features real data excites) and
information entropy (minus the entropy of the batch's mean prediction, so all classes appear equally).
The student learns by distillation on the same batches; generator and student take one step each per
iteration, alternately, as in the authors' MNIST recipe. Settings are the paper's MNIST ones (Adam, lr
0.2 for the generator and 2e-3 for the student, latent 100, weights 1 / 0.1 / 5, KD at temperature 1)
except the batch, which is the suite's student batch on this CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.peers.common import Clock, PeerResult, check_batch, frozen, train_mode
from kegnet.distill import kd_loss
from kegnet.models.taps import PenultimateTap

LATENT = 100
GENERATOR_LR = 0.2
STUDENT_LR = 2e-3
ONE_HOT, ACTIVATION, ENTROPY = 1.0, 0.1, 5.0
TEMPERATURE = 1.0


class ImageGenerator(nn.Module):
    """DAFL's generator: a linear map to 128 maps at a quarter of the side, two upsamplings with 3×3
    convolutions and BatchNorm, tanh, then a BatchNorm without affine (the teacher sees normalized inputs)."""

    def __init__(self, shape: tuple[int, int, int], latent: int = LATENT) -> None:
        super().__init__()
        self.shape, self.side = shape, max(1, -(-max(shape[1:]) // 4))
        self.fc = nn.Linear(latent, 128 * self.side ** 2)
        self.bn0 = nn.BatchNorm2d(128)
        self.block1 = nn.Sequential(nn.Conv2d(128, 128, 3, 1, 1), nn.BatchNorm2d(128, 0.8), nn.LeakyReLU(0.2))
        self.block2 = nn.Sequential(nn.Conv2d(128, 64, 3, 1, 1), nn.BatchNorm2d(64, 0.8), nn.LeakyReLU(0.2),
                                    nn.Conv2d(64, shape[0], 3, 1, 1), nn.Tanh(), nn.BatchNorm2d(shape[0], affine=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.bn0(self.fc(z).view(-1, 128, self.side, self.side))
        x = self.block1(F.interpolate(x, scale_factor=2))
        x = self.block2(F.interpolate(x, size=self.shape[1:]))
        return x


class VectorGenerator(nn.Module):
    """For tabular teachers (the paper has none): two hidden layers with BatchNorm and LeakyReLU, and the
    same final BatchNorm without affine, so features come out standardized as the teacher's inputs were."""

    def __init__(self, features: int, latent: int = LATENT, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, features), nn.BatchNorm1d(features, affine=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def make_generator(input_shape: tuple[int, ...]) -> nn.Module:
    if len(input_shape) == 3:
        return ImageGenerator((input_shape[0], input_shape[1], input_shape[2]))
    if len(input_shape) == 1:
        return VectorGenerator(input_shape[0])
    raise ValueError(f"DAFL here takes C×H×W images or flat vectors, got input shape {input_shape}")


def dafl_losses(logits: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
    """The paper's three generator losses on one batch of teacher outputs and penultimate features."""
    probs = F.softmax(logits, dim=1).mean(0)
    return {"one_hot": F.cross_entropy(logits, logits.argmax(1)),
            "activation": -features.abs().mean(),
            "entropy": (probs * torch.log10(probs + 1e-12)).sum()}  # minus the entropy (log10, as the authors)


def train(teacher: nn.Module, student: nn.Module, input_shape: tuple[int, ...], seconds: float, *,
          batch_size: int, device: torch.device, seed: int) -> PeerResult:
    """Train ``student`` in place by DAFL until ``seconds`` have passed; one step = one generator update
    and one student update."""
    clock, batch_size = Clock(seconds), check_batch(batch_size)
    torch.manual_seed(seed)
    teacher = frozen(teacher).to(device)
    generator = make_generator(tuple(input_shape)).to(device).train()
    train_mode(student.to(device))
    opt_g = torch.optim.Adam(generator.parameters(), lr=GENERATOR_LR)
    opt_s = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=STUDENT_LR)
    rng = torch.Generator(device=device).manual_seed(seed)
    steps = 0
    with PenultimateTap(teacher) as tap:
        while steps == 0 or not clock.spent():  # at least one step, however short the time
            z = torch.randn(batch_size, LATENT, generator=rng, device=device)
            x = generator(z)
            logits = teacher(x)
            terms = dafl_losses(logits, tap.value)
            loss_g = ONE_HOT * terms["one_hot"] + ACTIVATION * terms["activation"] + ENTROPY * terms["entropy"]
            loss_s = kd_loss(student(x.detach()), logits.detach(), TEMPERATURE)
            opt_g.zero_grad(set_to_none=True)
            opt_s.zero_grad(set_to_none=True)
            (loss_g + loss_s).backward()  # disjoint graphs: each loss reaches only its own model
            opt_g.step()
            opt_s.step()
            steps += 1
    student.eval()
    return PeerResult("dafl", {"generator": steps, "student": steps}, clock.elapsed(),
                      {"batch_size": batch_size, "generator_lr": GENERATOR_LR, "student_lr": STUDENT_LR,
                       "temperature": TEMPERATURE})
