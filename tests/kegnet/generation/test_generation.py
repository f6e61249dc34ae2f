import pytest
import torch
from torch import nn

from kegnet.config import GeneratorConfig
from kegnet.generation import Decoder, KegNetSampler, NoiseSampler, diversity_loss, make_generator, train_generators


@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 28, 28), (3, 64, 48), (2, 7, 9), (16,)])
def test_generator_makes_any_shape_standardized(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    g = make_generator(shape, 5, 10).train()
    x = g(torch.eye(5)[torch.randint(0, 5, (6,))], torch.randn(6, 10))
    assert x.shape == (6, *shape)
    if len(shape) == 3:  # per sample and channel
        assert torch.allclose(x.mean(dim=(2, 3)), torch.zeros(6, shape[0]), atol=1e-4)
        assert torch.allclose(x.flatten(2).std(dim=2), torch.ones(6, shape[0]), atol=1e-3)
    else:  # per feature over the batch
        assert torch.allclose(x.mean(0), torch.zeros(shape[0]), atol=1e-4)
    assert Decoder(int(torch.tensor(shape).prod()), 10, 2)(x).shape == (6, 10)


def test_diversity_loss_matches_the_broadcast_definition() -> None:
    torch.manual_seed(0)
    x, z = torch.randn(7, 3, 4, 4), torch.randn(7, 10)
    flat = x.flatten(1)
    d_x = (flat[:, None] - flat[None]).abs().mean(2)
    d_z = ((z[:, None] - z[None]) ** 2).mean(2)
    assert torch.allclose(diversity_loss(x, z), torch.exp(-(d_x * d_z).mean()), atol=1e-6)
    # More spread samples lower the loss.
    assert diversity_loss(3 * x, z) < diversity_loss(x, z)


class _BNTeacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_teacher_stays_frozen_and_untouched(mode: str) -> None:
    torch.manual_seed(0)
    teacher = _BNTeacher().eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = GeneratorConfig(num_generators=2, steps=3, batch_size=8, teacher_mode=mode)
    gens = train_generators(teacher, (1, 8, 8), 3, cfg, device=torch.device("cpu"), seed=0)
    assert len(gens) == 2 and not gens[0].training
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # running stats too
    assert not teacher.training


def test_generators_learn_the_teachers_classes() -> None:
    torch.manual_seed(0)
    teacher = nn.Linear(6, 3).eval()  # every class is reachable from standardized features
    cfg = GeneratorConfig(num_generators=1, steps=150, batch_size=64, lr=1e-2, beta=0.0)
    seen: list[float] = []
    gens = train_generators(teacher, (6,), 3, cfg, device=torch.device("cpu"), seed=0,
                            on_step=lambda s, m: seen.append(m["teacher_acc"]), report_every=50)
    assert seen[-1] > 0.9 and seen[-1] > seen[0]  # the teacher classifies the samples as the labels asked
    x, y = KegNetSampler(gens, 3, 10, torch.device("cpu")).sample(300, torch.Generator().manual_seed(1))
    assert (teacher(x).argmax(1) == y).float().mean() > 0.9


def test_noise_samplers_have_unit_variance() -> None:
    rng = torch.Generator().manual_seed(0)
    for kind in ("gaussian", "uniform"):
        x, y = NoiseSampler(kind, (3, 8, 8), torch.device("cpu")).sample(2000, rng)
        assert y is None and x.shape == (2000, 3, 8, 8)
        assert x.var().item() == pytest.approx(1.0, abs=0.02)
    assert x.abs().max() <= 3**0.5
