"""Spreading a parameter budget over layers by their weights' spectra: the same share of energy per layer
(``balanced``), or the least energy lost over all layers together (``global``).

One channel fraction for every layer (``allocation="uniform"``) starves small layers: on timm's lcnet_050 at
2.5x the first factorized layer kept rank 1 of 8. ``allocation="balanced"`` instead asks every mode of every
layer to keep at least ``1 - eps`` of its spectral energy (the squared singular values of the weight's
unfolding along that mode), and finds by bisection the smallest ``eps`` whose student meets the target
ratio. The sum of the tails along the two modes bounds a Tucker-2 truncation's relative error (HOSVD), and
the tail of one spectrum is exactly a truncated SVD's, so ``eps`` is a common, comparable error per layer:
a large, redundant layer gives up many ranks for it, a small one few. Measured on timm lcnet_050 (issue 21,
docs/benchmarks.md) it did worse than one fraction after fine-tuning: an equal loss in every layer still cuts
every layer.

``allocation="global"`` minimizes the *sum* over layers of the energy each loses, within the parameter
budget, with "leave the layer whole" (nothing lost, every parameter kept) as one of each layer's choices.
A layer whose spectrum is concentrated (timm lcnet_050's ``conv_head``: most of the weights, a few strong
directions) gives up many ranks for little; one with a flat spectrum (a small early conv) stays whole rather
than being starved. On the suite it is the default (docs/benchmarks.md, "where the ranks go"). It is
solved by the Lagrangian relaxation: for a price ``lam`` per parameter every layer picks the choice of least
``lost + lam * params`` on its own, and ``lam`` is bisected to the budget.
Energy lost is bounded by 1 per layer, so alone it would crush the largest layer (lcnet_050's head to rank
1 at 2.5x: 24% on MNIST); no rank goes below a floor, a multiple of the number of classes, which every class
must pass through (``compression.rank_floor``: 2 by default; at 1 MobileNetV3-small's head went to rank 10 and
a student lost 7 points), or, where that floor cannot reach the target, below the highest floor that can. A layer
too narrow for the floor (ResNet-14's 16-channel convs under twice 10 classes) would have no choice but whole;
its floor is the class count instead (the plan, ``kegnet.compression.plan``, gives each layer its ``min_rank``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorly as tl
from torch import nn

# Rank pair -> parameters after factorizing (or None: the layer is not smaller and stays whole).
ParamsOf = Callable[[str, int, int], int | None]


def energy_tails(m: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """``(tail_in, tail_out)``: ``tail[r]`` is the share of the weight's energy beyond rank ``r`` along the
    input (resp. output) channel mode, ``r = 0 .. full rank``; averaged over groups.

    Linear and 1×1 layers have one spectrum (a truncated SVD's ranks are one number), returned twice.
    """
    w = m.weight.detach().cpu().double().numpy()
    groups = getattr(m, "groups", 1)
    per_out = w.shape[0] // groups
    tails_in, tails_out = [], []
    for i in range(groups):
        g = w[i * per_out:(i + 1) * per_out]
        if g.ndim == 2 or g.shape[2:] == (1, 1):
            tail = _tail(np.linalg.svd(g.reshape(g.shape[0], g.shape[1]), compute_uv=False))
            tails_in.append(tail)
            tails_out.append(tail)
        else:
            tails_in.append(_tail(np.linalg.svd(tl.unfold(g, 1), compute_uv=False)))
            tails_out.append(_tail(np.linalg.svd(tl.unfold(g, 0), compute_uv=False)))
    return np.mean(tails_in, axis=0), np.mean(tails_out, axis=0)


def _tail(singular_values: np.ndarray) -> np.ndarray:
    energy = singular_values**2
    total = energy.sum()
    if total <= 0:  # an all-zero layer: nothing is lost at any rank
        return np.zeros(len(energy) + 1)
    kept = np.concatenate([[0.0], np.cumsum(energy)]) / total
    return np.clip(1.0 - kept, 0.0, 1.0)


def rank_for(tail: np.ndarray, eps: float) -> int:
    """The smallest rank (at least 1) whose energy tail is at most ``eps``."""
    within = np.nonzero(tail <= eps + 1e-12)[0]
    return max(1, int(within[0]) if len(within) else len(tail) - 1)


def ranks_at(tails: dict[str, tuple[np.ndarray, np.ndarray]], eps: float) -> dict[str, tuple[int, int]]:
    """Every layer's ``(in_rank, out_rank)`` keeping at least ``1 - eps`` of each mode's energy."""
    return {name: (rank_for(t_in, eps), rank_for(t_out, eps)) for name, (t_in, t_out) in tails.items()}


def balanced_eps(tails: dict[str, tuple[np.ndarray, np.ndarray]], params_before: dict[str, int],
                 params_of: ParamsOf, budget: int) -> float | None:
    """The smallest ``eps`` whose layers fit in ``budget`` parameters (a layer not made smaller by its ranks
    counts whole), or None when even rank 1 everywhere does not fit."""

    def cost(eps: float) -> int:
        total = 0
        for name, (r_in, r_out) in ranks_at(tails, eps).items():
            after = params_of(name, r_in, r_out)
            total += params_before[name] if after is None else after
        return total

    if cost(1.0) > budget:
        return None
    lo, hi = 0.0, 1.0  # cost(hi) fits; cost falls as eps grows
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cost(mid) <= budget else (mid, hi)
    return hi


def kept_energy(tails: tuple[np.ndarray, np.ndarray], r_in: int, r_out: int) -> float:
    """The share of the layer's energy its ranks keep, by the worse of its two modes (manifest figure)."""
    t_in, t_out = tails
    return float(1.0 - max(t_in[min(r_in, len(t_in) - 1)], t_out[min(r_out, len(t_out) - 1)]))


# A choice of ranks for one layer: (energy lost, parameters after, in_rank, out_rank); arrays over choices.
Choices = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
# Parameters after factorizing at arrays of (in_rank, out_rank), elementwise.
GridParams = Callable[[np.ndarray, np.ndarray], np.ndarray]


def choices(tails: tuple[np.ndarray, np.ndarray], single: bool, params_before: int, params: GridParams,
            min_rank: int = 1) -> Choices:
    """Every rank choice of one layer that makes it smaller, plus leaving it whole (loss 0, full ranks).

    ``single``: one rank (truncated SVD: loss ``tail[r]``), else a Tucker-2 pair (loss ``tail_in[r_in] +
    tail_out[r_out]``, the HOSVD bound). Ranks below ``min_rank`` (or the full rank, if smaller) are not
    offered.
    """
    t_in, t_out = tails
    full_in, full_out = len(t_in) - 1, len(t_out) - 1
    lo_in, lo_out = min(min_rank, full_in), min(min_rank, full_out)
    if single:
        r_in = r_out = np.arange(lo_in, full_in + 1)
        lost = t_in[r_in]
    else:
        r_in, r_out = (a.ravel() for a in np.meshgrid(np.arange(lo_in, full_in + 1), np.arange(lo_out, full_out + 1),
                                                       indexing="ij"))
        lost = t_in[r_in] + t_out[r_out]
    after = np.asarray(params(r_in, r_out), dtype=np.int64)
    smaller = after < params_before
    return (np.concatenate([[0.0], lost[smaller]]), np.concatenate([[params_before], after[smaller]]),
            np.concatenate([[full_in], r_in[smaller]]), np.concatenate([[full_out], r_out[smaller]]))


def highest_floor(options_at: Callable[[int], dict[str, Choices]], ceiling: int, budget: int) -> int | None:
    """The highest rank floor in ``1 .. ceiling`` whose smallest choices fit in ``budget`` (bisection: a lower
    floor only adds choices), or None when even floor 1 does not fit."""

    def fits(floor: int) -> bool:
        return sum(int(o[1].min()) for o in options_at(floor).values()) <= budget

    if fits(ceiling):
        return ceiling
    if not fits(1):
        return None
    lo, hi = 1, ceiling  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def global_ranks(options: dict[str, Choices], budget: int) -> dict[str, tuple[int, int]] | None:
    """The rank pair of every layer that loses the least summed energy within ``budget`` parameters (a layer
    left whole gets its full ranks), or None when even the smallest choices do not fit."""

    def pick(lam: float) -> dict[str, int]:
        return {name: int(np.argmin(lost + lam * params)) for name, (lost, params, _, _) in options.items()}

    def cost(picked: dict[str, int]) -> int:
        return sum(int(options[name][1][i]) for name, i in picked.items())

    if sum(int(o[1].min()) for o in options.values()) > budget:
        return None
    # Price per parameter: raise hi until the budget is met. It ends by hi = 10: a loss is at most 2 (two
    # tails of at most 1) and parameter counts differ by at least 1, so above a price of 2 every layer takes
    # its fewest parameters, which fit (checked above).
    lo, hi = 0.0, 1.0
    while cost(pick(hi)) > budget:
        lo, hi = hi, hi * 10
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cost(pick(mid)) <= budget else (mid, hi)
    chosen = pick(hi)
    _spend(options, chosen, budget - cost(chosen))
    return {name: (int(options[name][2][i]), int(options[name][3][i])) for name, i in chosen.items()}


def _spend(options: dict[str, Choices], chosen: dict[str, int], spare: int) -> None:
    """Give budget the relaxation left unspent (its choices jump) to the layers, one change at a time: the
    choice that loses least energy per extra parameter and still fits, until none does (``chosen`` in place)."""
    while spare > 0:
        best: tuple[float, str, int] | None = None
        for name, (lost, params, _, _) in options.items():
            extra = params - params[chosen[name]]
            gain = lost[chosen[name]] - lost
            fits = np.nonzero((extra > 0) & (extra <= spare) & (gain > 0))[0]
            if len(fits):
                i = int(fits[np.argmax(gain[fits] / extra[fits])])
                rate = float(gain[i] / extra[i])
                if best is None or rate > best[0]:
                    best = (rate, name, i)
        if best is None:
            return
        _, name, i = best
        spare -= int(options[name][1][i] - options[name][1][chosen[name]])
        chosen[name] = i
