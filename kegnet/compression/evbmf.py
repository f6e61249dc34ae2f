"""Rank estimation by Empirical Variational Bayes Matrix Factorization.

The global analytic solution of Nakajima et al., "Global analytic solution of fully-observed variational
Bayesian matrix factorization", JMLR 14 (2013): the noise variance is chosen by minimizing the free energy,
and the rank is the number of singular values above the resulting threshold.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def _free_energy(sigma2: float, L: int, M: int, s: np.ndarray, residual: float, xubar: float) -> float:
    """Objective of the noise variance (JMLR 2013, the EVB free energy up to constants)."""
    alpha = L / M
    x = s**2 / (M * sigma2)
    above, below = x[x > xubar], x[x <= xubar]
    tau_above = _tau(above, alpha)
    energy = np.sum(below - np.log(below))
    energy += np.sum(above - tau_above) + np.sum(np.log((tau_above + 1) / above))
    energy += alpha * np.sum(np.log(tau_above / alpha + 1))
    return float(energy + residual / (M * sigma2) + (L - len(s)) * np.log(sigma2))


def evbmf_rank(matrix: np.ndarray) -> int:
    """Number of components EVBMF keeps for ``matrix`` (any 2-D shape); may be 0 for noise-like input."""
    y = np.asarray(matrix, dtype=np.float64)
    if y.shape[0] > y.shape[1]:
        y = y.T  # the analytic solution is stated for L <= M
    L, M = y.shape
    s = np.linalg.svd(y, compute_uv=False)
    alpha = L / M
    tau_bar = 2.5129 * math.sqrt(alpha)
    xubar = (1 + tau_bar) * (1 + alpha / tau_bar)

    # Bounds on the noise variance from the paper's Theorem (all L singular values are kept, so no residual).
    residual = 0.0
    upper = (np.sum(s**2) + residual) / (L * M)
    eh_ub = int(min(math.ceil(L / (1 + alpha)) - 1, L)) - 1
    lower = max(s[eh_ub + 1] ** 2 / (M * xubar), np.mean(s[eh_ub + 1 :] ** 2) / M)
    if not upper > lower > 0:
        return int(np.sum(s > 0))
    sigma2 = optimize.minimize_scalar(
        _free_energy, args=(L, M, s, residual, xubar), bounds=(lower, upper), method="bounded"
    ).x
    threshold = math.sqrt(M * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    return int(np.sum(s > threshold))
