import torch
import torch.nn.functional as F
from torch import nn

from kegnet.config import DistillConfig
from kegnet.distill import distill, kd_loss
from kegnet.generation import NoiseSampler


def test_kd_loss_is_kl_times_t_squared() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    expected = (F.softmax(t / 3, 1) * (F.log_softmax(t / 3, 1) - F.log_softmax(s / 3, 1))).sum(1).mean() * 9
    assert torch.allclose(kd_loss(s, t, 3.0), expected, atol=1e-6)
    assert kd_loss(t, t, 3.0).abs() < 1e-6


def test_distillation_raises_synthetic_agreement_and_keeps_the_best() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    student = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    cfg = DistillConfig(steps=200, batch_size=128, lr=3e-3, eval_every=50, holdout_samples=512)
    result = distill(teacher, student, NoiseSampler("gaussian", (8,), torch.device("cpu")), cfg,
                     device=torch.device("cpu"), seed=0)
    assert result.best_agreement > 0.85 > result.initial_agreement
    assert result.best_agreement == max(r["agreement"] for r in result.curve)
    assert [r["step"] for r in result.curve] == [0, 50, 100, 150, 200]
    assert not result.retried and result.lr == cfg.lr  # the first graded step beat the start: one pass


def test_mix_samples_mixes_only_the_requested_share() -> None:
    from kegnet.distill.train import mix_samples

    x = torch.stack([torch.full((2, 3), float(v)) for v in (0, 10, 20, 30)])
    out = mix_samples(x, 0.5, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.equal(out[2:], x[2:])
    assert ((out[:2] >= 0) & (out[:2] <= 30)).all()  # convex mixes stay inside the samples' range
    assert torch.equal(mix_samples(x, 0.0, torch.Generator()), x)


def test_adversary_moves_copies_toward_disagreement_and_leaves_the_originals() -> None:
    from kegnet.distill.adversary import GeneratorAdversary
    from kegnet.generation import KegNetSampler, make_generator

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    student = nn.Sequential(nn.Linear(6, 3))
    gens = [make_generator((6,), 3, 4).eval() for _ in range(2)]
    before = [{k: v.clone() for k, v in g.state_dict().items()} for g in gens]
    source = KegNetSampler(gens, 3, 4, torch.device("cpu"))
    adversary = GeneratorAdversary(source, teacher, weight=1.0, beta=0.0, lr=1e-2, batch_size=64, temperature=1.0)
    rng = torch.Generator().manual_seed(0)
    first = adversary.step(student, rng)
    for _ in range(60):
        last = adversary.step(student, rng)
    assert last > first  # the copies found samples where the student disagrees more
    assert all(torch.equal(before[i][k], v) for i, g in enumerate(gens) for k, v in g.state_dict().items())
    assert all(p.grad is None for p in [*teacher.parameters(), *student.parameters()])
    x, y = adversary.sample(10, rng)  # half from the moved copies, half from the originals
    assert x.shape == (10, 6) and y.shape == (10,)


def test_adversarial_fine_tuning_runs_through_distill() -> None:
    from kegnet.generation import KegNetSampler, make_generator

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    student = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    sampler = KegNetSampler([make_generator((6,), 3, 4).eval()], 3, 4, torch.device("cpu"))
    cfg = DistillConfig(steps=20, batch_size=32, eval_every=10, holdout_samples=64, adversarial_weight=1.0)
    result = distill(teacher, student, sampler, cfg, device=torch.device("cpu"), seed=0, diversity_beta=1.0)
    assert [r["step"] for r in result.curve] == [0, 10, 20]


def test_student_dropout_is_off_unless_asked_for() -> None:
    teacher = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    modes: dict[bool, set[bool]] = {False: set(), True: set()}
    for keep in (False, True):
        student = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))

        def record(module: nn.Module, inputs: object, output: object, keep: bool = keep) -> None:
            if torch.is_grad_enabled():  # training steps only, not the held-out evaluation
                modes[keep].add(module.training)

        student[2].register_forward_hook(record)
        cfg = DistillConfig(steps=3, batch_size=8, holdout_samples=64, eval_every=3, student_dropout=keep)
        distill(teacher, student, NoiseSampler("gaussian", (4,), torch.device("cpu")), cfg,
                device=torch.device("cpu"), seed=0)
    assert modes == {False: {False}, True: {True}}


def test_noise_share_mixes_gaussian_noise_into_the_batches() -> None:
    from kegnet.generation.samplers import MixedSampler, Sampler

    class Ones(Sampler):
        def sample(self, n: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.ones(n, 4), torch.zeros(n, dtype=torch.long)

    rng = torch.Generator().manual_seed(0)
    x, y = MixedSampler(Ones(), NoiseSampler("gaussian", (4,), torch.device("cpu")), 0.25).sample(8, rng)
    assert x.shape == (8, 4) and y is None  # noise has no labels
    assert (x == 1).all(dim=1).sum() == 6  # 2 of the 8 rows are noise
    x, y = MixedSampler(Ones(), Ones(), 0.5).sample(8, rng)
    assert y is not None and len(y) == 8


def test_a_start_the_first_pass_falls_below_is_fine_tuned_again_at_a_lower_rate() -> None:
    import copy

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    start = copy.deepcopy(teacher)
    with torch.no_grad():  # close to the teacher, as a good decomposition is
        start[0].weight.add_(0.05 * torch.randn_like(start[0].weight))
    sampler = NoiseSampler("gaussian", (8,), torch.device("cpu"))
    # lr 1.0 throws the student off at the first step; the retry runs at 1.0 * 0.001.
    cfg = DistillConfig(steps=100, batch_size=128, lr=1.0, eval_every=25, holdout_samples=512, retry_lr=1e-3)
    student = copy.deepcopy(start)
    result = distill(teacher, student, sampler, cfg, device=torch.device("cpu"), seed=0)
    assert result.retried and result.lr == 1e-3 and result.best_step > 0
    assert result.best_agreement > result.initial_agreement
    # The start, the first pass's first graded step (below the start: the pass stops there), then the retry.
    assert [r.get("lr") for r in result.curve] == [None] * 2 + [1e-3] * 4
    assert result.curve[1]["agreement"] < result.initial_agreement

    never = copy.deepcopy(start)
    kept = distill(teacher, never, sampler, cfg.model_copy(update={"retry_lr": 0.0}), device=torch.device("cpu"),
                   seed=0)
    assert not kept.retried and kept.best_step == 0 and kept.lr == 1.0
    assert all(torch.equal(a, b) for a, b in zip(never.state_dict().values(), start.state_dict().values(),
                                                 strict=True))  # the start, untouched


def test_the_retry_waits_for_the_samples_the_teacher_is_sure_of_to_fall_too() -> None:
    from kegnet.distill.exam import MIN_SURE_SAMPLES, Exam
    from kegnet.distill.train import DistillResult, _dip_test

    teacher = nn.Linear(1, 2)
    with torch.no_grad():  # logits (x, -x): the boundary at 0, sure far from it
        teacher.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        teacher.bias.zero_()
    far = torch.cat([torch.linspace(3, 5, 20), -torch.linspace(3, 5, 20)])
    near = torch.linspace(-0.1, 0.1, 41)
    x = torch.cat([far, near]).unsqueeze(1)
    with torch.no_grad():
        exam = Exam(x, teacher(x), {"samples": len(x)})
    result = DistillResult(best_step=0, best_agreement=1.0, initial_agreement=1.0,
                           curve=[{"step": 0, "agreement": 1.0}, {"step": 25, "agreement": 0.8}])
    dipped = _dip_test(teacher, exam, result)
    shifted = nn.Linear(1, 2)  # moved the boundary a little: only boundary samples change class
    flipped = nn.Linear(1, 2)  # every class swapped
    with torch.no_grad():
        shifted.weight.copy_(teacher.weight)
        shifted.bias.copy_(torch.tensor([0.2, -0.2]))
        flipped.weight.copy_(-teacher.weight)
        flipped.bias.zero_()
    assert not dipped(shifted) and dipped(flipped)
    # A step that did not fall on the whole exam never retries.
    result.curve[1]["agreement"] = 1.0
    assert not dipped(flipped)
    # Where the teacher is sure of too few samples, the whole exam decides alone.
    few = Exam(exam.x[-(MIN_SURE_SAMPLES + 10):], exam.teacher_logits[-(MIN_SURE_SAMPLES + 10):], {"samples": 26})
    result.curve[1]["agreement"] = 0.8
    assert _dip_test(teacher, few, result)(shifted)
