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


def test_smoothness_loss_is_total_variation() -> None:
    from kegnet.generation import smoothness_loss

    flat = torch.ones(2, 1, 5, 5)
    assert smoothness_loss(flat) == 0
    stripes = torch.zeros(2, 1, 4, 4)
    stripes[:, :, :, 1::2] = 1.0  # every column step changes by 1, no row step does
    assert smoothness_loss(stripes) == pytest.approx(1.0)
    assert smoothness_loss(torch.randn(2, 3, 8, 8)) > smoothness_loss(torch.randn(2, 3, 8, 8).cumsum(3) / 8)


def test_smoothness_prior_makes_smoother_generators() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    from kegnet.generation import smoothness_loss

    rough, smooth = (train_generators(teacher, (1, 8, 8), 3,
                                      GeneratorConfig(num_generators=1, steps=60, batch_size=32, smoothness=w),
                                      device=torch.device("cpu"), seed=0)[0] for w in (0.0, 5.0))
    labels, noise = torch.eye(3).repeat(20, 1), torch.randn(60, 10)
    with torch.no_grad():
        assert smoothness_loss(smooth(labels, noise)) < 0.8 * smoothness_loss(rough(labels, noise))


def test_activation_reward_strengthens_the_teachers_features() -> None:
    from kegnet.generation.train import PenultimateTap

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    tap = PenultimateTap(teacher)
    strength = []
    for weight in (0.0, 1.0):
        cfg = GeneratorConfig(num_generators=1, steps=80, batch_size=32, lr=1e-2, beta=0.0, activation=weight)
        (g,) = train_generators(teacher, (6,), 3, cfg, device=torch.device("cpu"), seed=0)
        with torch.no_grad():
            teacher(g(torch.eye(3).repeat(20, 1), torch.randn(60, 10)))
        strength.append(tap.value.abs().mean().item())
    assert strength[1] > 1.2 * strength[0]


def test_activation_default_is_off_for_vectors() -> None:
    # The default (None) means 0.1 for images and 0 for vectors: on a vector teacher it must train exactly
    # what activation=0 trains.
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    weights = []
    for activation in (None, 0.0, 0.5):
        cfg = GeneratorConfig(num_generators=1, steps=5, batch_size=16, activation=activation)
        (g,) = train_generators(teacher, (6,), 3, cfg, device=torch.device("cpu"), seed=0)
        weights.append(torch.cat([p.flatten() for p in g.parameters()]))
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_batchnorm_prior_pulls_batches_toward_the_running_statistics() -> None:
    from kegnet.generation.train import freeze
    from kegnet.models.taps import BatchNormStatistics

    torch.manual_seed(0)
    teacher = _BNTeacher()
    teacher.bn.momentum = None  # cumulative average: the running statistics of this "real" data exactly
    with torch.no_grad():  # smooth images, unlike what an untrained generator makes
        from kegnet.generation.models import standardize_images

        teacher(standardize_images(torch.randn(512, 1, 8, 8).cumsum(2).cumsum(3)))
    teacher.eval()
    probe = freeze(teacher, "eval")
    stats = BatchNormStatistics(probe, groups=1)
    distance = []
    for weight in (0.0, 1.0):
        cfg = GeneratorConfig(num_generators=1, steps=60, batch_size=32, lr=1e-2, batchnorm_prior=weight)
        (g,) = train_generators(teacher, (1, 8, 8), 3, cfg, device=torch.device("cpu"), seed=0)
        with torch.no_grad():
            probe(g(torch.eye(3).repeat(20, 1), torch.randn(60, 10)))
        distance.append(stats.pop().item())
    assert distance[1] < 0.5 * distance[0]
    assert all(p.grad is None for p in teacher.parameters())


def test_one_teacher_call_per_generator_gives_the_same_gradients(monkeypatch) -> None:
    """Large inputs train each generator in its own teacher call (memory); the update must not change."""
    import kegnet.generation.train as train

    class FirstStep(Exception):
        pass

    class RecordingAdam(torch.optim.Adam):
        def step(self, closure=None):  # noqa: ANN001, ANN202 - the optimizer's own signature
            grads.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
            raise FirstStep

    monkeypatch.setattr(train.torch.optim, "Adam", RecordingAdam)
    torch.manual_seed(0)
    teacher = _BNTeacher().eval()
    cfg = GeneratorConfig(num_generators=3, steps=1, batch_size=8, batchnorm_prior=0.5, activation=0.1)
    grads: list[list[torch.Tensor]] = []
    for limit in (1 << 30, 0):  # all generators in one call, then one call each
        monkeypatch.setattr(train, "CONCAT_LIMIT", limit)
        with pytest.raises(FirstStep):
            train_generators(teacher, (1, 8, 8), 3, cfg, device=torch.device("cpu"), seed=0)
    together, apart = grads
    assert len(together) == len(apart) and any(g.abs().sum() > 0 for g in together)
    for a, b in zip(together, apart, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
