"""Factorized replacements for Conv2d (Tucker-2) and Linear (truncated SVD).

Both are built in two steps: ``__init__`` creates the structure from shapes and ranks only (used to
rebuild a saved student), and ``from_conv`` / ``from_linear`` also initializes the factors from a
trained layer.
"""

from __future__ import annotations

import numpy as np
import torch
from tensorly.decomposition import partial_tucker
from torch import nn


class Tucker2Conv2d(nn.Module):
    """Conv2d factorized along its two channel modes (Kim et al. 2016).

    ``first``: 1×1, C_in → R_in·g, no bias (a bias here would be wrong at zero-padded borders);
    ``core``: k×k, R_in → R_out per group, with the original stride, padding, dilation and padding mode;
    ``last``: 1×1, R_out·g → C_out, carrying the original bias. ``g`` is the original conv's group count:
    each group is decomposed on its own, so grouped convs keep their structure.

    Shapes: ``(N, C_in, H, W) -> (N, C_out, H', W')``, identical to the original conv.
    """

    def __init__(self, conv: nn.Conv2d, in_rank: int, out_rank: int) -> None:
        super().__init__()
        g = conv.groups
        self.in_rank, self.out_rank = in_rank, out_rank
        self.first = nn.Conv2d(conv.in_channels, in_rank * g, 1, groups=g, bias=False)
        self.core = nn.Conv2d(
            in_rank * g, out_rank * g, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=g, bias=False, padding_mode=conv.padding_mode,
        )
        self.last = nn.Conv2d(out_rank * g, conv.out_channels, 1, groups=g, bias=conv.bias is not None)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, in_rank: int, out_rank: int, n_iter_max: int = 100,
                  seed: int = 0) -> Tucker2Conv2d:
        """Initialize from ``partial_tucker`` of each group's (C_out/g, C_in/g, k, k) weight."""
        layer = cls(conv, in_rank, out_rank).to(conv.weight.device)
        g = conv.groups
        # Decompose in float64 numpy: exact, and independent of tensorly's global backend.
        weight = conv.weight.detach().cpu().double().numpy()
        per_out = conv.out_channels // g
        firsts, cores, lasts = [], [], []
        for i in range(g):
            w = weight[i * per_out:(i + 1) * per_out]
            (core, (u_out, u_in)), _ = partial_tucker(
                w, rank=[out_rank, in_rank], modes=[0, 1], n_iter_max=n_iter_max, init="svd",
                random_state=seed,
            )
            firsts.append(u_in.T)      # (R_in, C_in/g)
            cores.append(core)         # (R_out, R_in, k, k)
            lasts.append(u_out)        # (C_out/g, R_out)
        dtype = conv.weight.dtype
        with torch.no_grad():
            layer.first.weight.copy_(_t(np.concatenate(firsts))[..., None, None].to(dtype))
            layer.core.weight.copy_(_t(np.concatenate(cores)).to(dtype))
            layer.last.weight.copy_(_t(np.concatenate(lasts))[..., None, None].to(dtype))
            if conv.bias is not None:
                layer.last.bias.copy_(conv.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))


class LowRankConv1x1(nn.Module):
    """A 1×1 conv factorized by truncated SVD: ``C_in → R·g`` (1×1, the original stride, no bias) then
    ``R·g → C_out`` (1×1, the original bias), per group.

    Tucker-2 would add an R×R core to a 1×1 kernel for nothing; MobileNets, EfficientNets, RegNets and
    ConvNeXts keep most of their weights in 1×1 convs. Shapes: as the original conv.
    """

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        g = conv.groups
        self.rank = rank
        self.first = nn.Conv2d(conv.in_channels, rank * g, 1, stride=conv.stride, padding=conv.padding,
                               groups=g, bias=False, padding_mode=conv.padding_mode)
        self.last = nn.Conv2d(rank * g, conv.out_channels, 1, groups=g, bias=conv.bias is not None)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int) -> LowRankConv1x1:
        layer = cls(conv, rank).to(conv.weight.device)
        g = conv.groups
        weight = conv.weight.detach().cpu().double().numpy()[:, :, 0, 0]  # (C_out, C_in/g)
        per_out = conv.out_channels // g
        firsts, lasts = [], []
        for i in range(g):
            u, s, vh = np.linalg.svd(weight[i * per_out:(i + 1) * per_out], full_matrices=False)
            root = np.sqrt(s[:rank])
            firsts.append(root[:, None] * vh[:rank])   # (R, C_in/g)
            lasts.append(u[:, :rank] * root[None, :])   # (C_out/g, R)
        dtype = conv.weight.dtype
        with torch.no_grad():
            layer.first.weight.copy_(_t(np.concatenate(firsts))[..., None, None].to(dtype))
            layer.last.weight.copy_(_t(np.concatenate(lasts))[..., None, None].to(dtype))
            if conv.bias is not None:
                layer.last.bias.copy_(conv.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.first(x))


class LowRankLinear(nn.Module):
    """Linear factorized by truncated SVD: ``in → rank`` (no bias) then ``rank → out`` (original bias).

    Shapes: ``(N, in_features) -> (N, out_features)``.
    """

    def __init__(self, linear: nn.Linear, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.first = nn.Linear(linear.in_features, rank, bias=False)
        self.last = nn.Linear(rank, linear.out_features, bias=linear.bias is not None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        layer = cls(linear, rank).to(linear.weight.device)
        u, s, vh = np.linalg.svd(linear.weight.detach().cpu().double().numpy(), full_matrices=False)
        root = np.sqrt(s[:rank])
        dtype = linear.weight.dtype
        with torch.no_grad():
            layer.first.weight.copy_(_t(root[:, None] * vh[:rank]).to(dtype))
            layer.last.weight.copy_(_t(u[:, :rank] * root[None, :]).to(dtype))
            if linear.bias is not None:
                layer.last.bias.copy_(linear.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.first(x))


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))
