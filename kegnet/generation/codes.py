"""Class codes: what the generators are asked for, one row per sample, each a point of the class simplex.

The generators learn from one-hot codes only. While the student learns, other schemes ask them for
mixes, which land between classes, near the teacher's decision boundaries:

- ``one_hot``: one uniformly drawn class (the paper);
- ``simplex``: a uniform point of the whole simplex (Dirichlet(1, ..., 1)); with many classes this is close
  to the uniform mix, far from every class (measured: 26-class UCI letter, docs/benchmarks.md);
- ``pairs``: a uniform mix ``l e_i + (1 - l) e_j`` of two distinct random classes, whatever their number;
- ``sparse``: Dirichlet(a, ..., a) with ``a = min(1, 2 / (C - 1))``, whose expected effective number of
  classes ``1 / E[sum p^2] = (C a + 1) / (a + 1)`` stays below 3 for every class count C.

Every function draws from ``generator`` only, so a seed repeats the codes. Shapes: ``(n, num_classes)``.
"""

from __future__ import annotations

from typing import get_args

import numpy as np
import torch
import torch.nn.functional as F

from kegnet.config import CodeScheme

CODE_SCHEMES: tuple[str, ...] = get_args(CodeScheme)


def sample_labels(n: int, num_classes: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Uniformly drawn classes as one-hot rows."""
    idx = torch.randint(num_classes, (n,), generator=generator, device=device)
    return F.one_hot(idx, num_classes).float()


def simplex_codes(n: int, num_classes: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Uniformly random points of the probability simplex: normalized standard exponentials."""
    e = -torch.log1p(-torch.rand(n, num_classes, generator=generator, device=device))  # Exp(1), never inf
    return e / e.sum(dim=1, keepdim=True)


def pair_codes(n: int, num_classes: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Uniform mixes of two distinct random classes (one class when there is only one)."""
    i = torch.randint(num_classes, (n,), generator=generator, device=device)
    if num_classes == 1:
        return F.one_hot(i, 1).float()
    j = (i + torch.randint(1, num_classes, (n,), generator=generator, device=device)) % num_classes  # j != i
    lam = torch.rand(n, 1, generator=generator, device=device)
    return lam * F.one_hot(i, num_classes).float() + (1 - lam) * F.one_hot(j, num_classes).float()


def sparse_concentration(num_classes: int) -> float:
    """The Dirichlet concentration of ``sparse`` codes for ``num_classes`` classes."""
    return min(1.0, 2.0 / max(num_classes - 1, 1))


def sparse_codes(n: int, num_classes: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Symmetric Dirichlet draws with a concentration that falls with the class count.

    torch's Gamma sampler takes no ``generator``, so numpy draws them from a seed taken from ``generator``.
    """
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device).item())
    alpha = np.full(num_classes, sparse_concentration(num_classes))
    codes = np.random.default_rng(seed).dirichlet(alpha, size=n)
    return torch.from_numpy(codes).float().to(device)


_DRAW = {"one_hot": sample_labels, "simplex": simplex_codes, "pairs": pair_codes, "sparse": sparse_codes}


def draw_codes(scheme: str, n: int, num_classes: int, generator: torch.Generator,
               device: torch.device) -> torch.Tensor:
    """``n`` codes of ``scheme`` (one of ``CODE_SCHEMES``)."""
    if scheme not in _DRAW:
        raise ValueError(f"unknown class-code scheme {scheme!r}; use one of {', '.join(CODE_SCHEMES)}")
    return _DRAW[scheme](n, num_classes, generator, device)
