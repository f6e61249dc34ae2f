"""DeepInversion's priors (bench/peers/deepinversion.py)."""

import torch
from torch import nn

from bench.peers.deepinversion import BatchNormGap, total_variation


def test_batchnorm_gap_is_small_for_batches_with_the_running_statistics() -> None:
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.fill_(2.0)
    bn.running_var.fill_(4.0)
    torch.manual_seed(0)
    with BatchNormGap(bn) as gap:
        bn(torch.randn(64, 3, 8, 8) * 2 + 2)
        matching = gap.pop()
        bn(torch.randn(64, 3, 8, 8))
        standard = gap.pop()
    assert gap.count == 1
    assert matching < 0.2 < 3 < standard
    assert not bn._forward_pre_hooks  # the hooks are gone after the block


def test_total_variation_is_zero_for_a_flat_image_only() -> None:
    flat = torch.full((2, 1, 6, 6), 0.7)
    assert total_variation(flat) == 0
    assert total_variation(flat + 0.1 * torch.randn_like(flat)) > 0
