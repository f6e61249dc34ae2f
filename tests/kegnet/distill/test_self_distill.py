"""Data-distortion guided self-distillation: views, symmetric KL, linear MMD."""

import torch
import torch.nn.functional as F

from kegnet.distill.self_distill import distort, linear_mmd2, max_shift, symmetric_kl, translate


def test_symmetric_kl_is_symmetric_zero_on_identical_views_and_sums_both_directions() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    assert torch.allclose(symmetric_kl(a, b), symmetric_kl(b, a))
    assert symmetric_kl(a, a).abs() < 1e-6
    pa, pb = F.softmax(a, 1), F.softmax(b, 1)
    expected = ((pa * (pa.log() - pb.log())).sum(1) + (pb * (pb.log() - pa.log())).sum(1)).mean()
    assert torch.allclose(symmetric_kl(a, b), expected, atol=1e-6) and expected > 0.1


def test_symmetric_kl_sends_gradients_to_both_views() -> None:
    a, b = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    symmetric_kl(a, b).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_linear_mmd_is_the_squared_distance_of_the_means() -> None:
    torch.manual_seed(0)
    a = torch.randn(16, 2, 3)
    assert linear_mmd2(a, a) == 0
    shift = torch.arange(6.0).reshape(2, 3)
    assert torch.allclose(linear_mmd2(a, a + shift), shift.square().sum())
    assert torch.allclose(linear_mmd2(a, a[torch.randperm(16)]), torch.zeros(()), atol=1e-10)  # order-free


def test_translate_shifts_each_image_without_flipping() -> None:
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float).reshape(2, 1, 8, 8)
    out = translate(x, 2, torch.Generator().manual_seed(3))
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    for n in range(2):
        crops = [(dy, dx) for dy in range(5) for dx in range(5)
                 if torch.equal(out[n], padded[n, :, dy:dy + 8, dx:dx + 8])]
        assert len(crops) == 1  # exactly one translation explains it (so no flip, no other change)
    assert torch.equal(translate(x, 0, torch.Generator()), x)


def test_distort_is_seeded_bounded_and_keeps_shapes() -> None:
    x = torch.randn(64, 1, 12, 12)
    a = distort(x, 0.5, torch.Generator().manual_seed(0))
    b = distort(x, 0.5, torch.Generator().manual_seed(0))
    c = distort(x, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == x.shape
    assert torch.equal(distort(x, 0.0, torch.Generator()), x)
    assert max_shift(12, 12, 1.0) == 3 and max_shift(32, 32, 0.5) == 2 and max_shift(4, 4, 0.1) == 0


def test_vector_views_get_noise_and_feature_dropout() -> None:
    x = torch.randn(2000, 10) + 5.0  # away from 0, so dropped features are recognisable
    out = distort(x, 1.0, torch.Generator().manual_seed(0))
    dropped = (out == 0).float().mean().item()
    assert 0.15 < dropped < 0.25  # p = 0.2 at strength 1
    kept = out != 0
    noise = (out - x)[kept]
    assert 0.15 < noise.std().item() < 0.25 and noise.abs().max() > 0  # std 0.2, unscaled
