"""Monte Carlo statistics, once: every simulated or resampled number the suite reports
goes through these, so each carries its standard error and replication count.

All functions take replications along axis 0.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["Z95", "mean_se", "mean_ci", "sq_dev", "trace_cov_se", "paired_ratio", "z_score", "p_two_sided", "holm",
           "holm_threshold", "extrapolate_inv_n", "delta_se",
           "wilson"]

#: two-sided 95% normal quantile, ``Phi^-1(0.975)``
Z95 = 1.959963984540054


def mean_se(x) -> tuple[float, float]:
    """Mean of the finite entries of ``x`` and its standard error ``sd / sqrt(R)``.

    ``(nan, nan)`` for no finite entry, ``(x, nan)`` for one.
    """
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return np.nan, np.nan
    if x.size == 1:
        return float(x[0]), np.nan
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


def mean_ci(x: Sequence[float]) -> dict:
    """Mean with a normal 95% interval from its standard error: ``{mean, se, lo, hi, n}``."""
    x = np.asarray(x, float)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    m = float(x.mean())
    return {"mean": m, "se": se, "lo": m - Z95 * se, "hi": m + Z95 * se, "n": int(len(x))}


def sq_dev(theta) -> np.ndarray:
    """``(R,)`` squared distances ``|theta_r - mean|^2 * R/(R-1)``: their mean is ``tr Cov(theta_hat)``.

    ``theta``: ``(R, d)`` replications.
    """
    theta = np.asarray(theta, dtype=float)
    R = theta.shape[0]
    return np.sum((theta - theta.mean(axis=0)) ** 2, axis=-1) * R / (R - 1)


def trace_cov_se(theta) -> tuple[float, float]:
    """``tr Cov(theta_hat)`` from replications ``theta (R, d)`` and its standard error.

    The SE is that of the mean of :func:`sq_dev` (delta method, ignoring the O(1/R)
    estimated-mean term).
    """
    D = sq_dev(theta)
    return float(D.mean()), float(D.std(ddof=1) / math.sqrt(D.size))


def paired_ratio(num, den) -> tuple[float, float]:
    """``mean(num) / mean(den)`` over paired replications and its delta-method SE.

    The SE is ``sd(num - r den) / (sqrt(R) mean(den))`` with ``r`` the ratio (the
    linearisation of ``a/b`` around the means); ``(nan, nan)`` for fewer than 3 pairs.
    """
    num, den = np.asarray(num, float), np.asarray(den, float)
    R = len(num)
    if R < 3:
        return np.nan, np.nan
    b = den.mean()
    r = num.mean() / b
    se = np.std(num - r * den, ddof=1) / math.sqrt(R) / abs(b)
    return float(r), float(se)


def z_score(est, se, pred=0.0, pred_se=0.0) -> float:
    """``(est - pred) / sqrt(se^2 + pred_se^2)``; NaN when the combined SE is 0 or not finite."""
    s = math.sqrt(float(np.nan_to_num(se)) ** 2 + float(np.nan_to_num(pred_se)) ** 2)
    if not (s > 0 and math.isfinite(s)):
        return float("nan")
    return (float(est) - float(pred)) / s


def p_two_sided(z) -> np.ndarray | float:
    """Two-sided normal p-value ``2 (1 - Phi(|z|))`` (``erfc(|z| / sqrt 2)``, accurate far in the tail)."""
    from scipy.special import erfc

    z = np.asarray(z, dtype=float)
    p = erfc(np.abs(z) / math.sqrt(2.0))
    return float(p) if p.ndim == 0 else p


def holm(p) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control under any dependence).

    ``p_adj[(i)] = max_{j <= i} min(1, (m - j + 1) p_(j))`` over the sorted p-values;
    reject at family-wise level ``alpha`` where ``p_adj <= alpha``. NaN p-values are
    left out of the family and stay NaN.
    """
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(adj)
    return out


def holm_threshold(m: int, alpha: float) -> float:
    """The ``|z|`` a single test needs to be rejected first by Holm among ``m`` tests at ``alpha``
    (the Bonferroni bound ``Phi^-1(1 - alpha / (2 m))``)."""
    from scipy.stats import norm

    return float(norm.isf(alpha / (2.0 * max(int(m), 1))))


def extrapolate_inv_n(n, y, se) -> dict:
    """Weighted least-squares fit ``y(n) = a + b / n`` over independent cells; ``a`` is the
    ``n -> infinity`` limit, ``b / n`` the finite-sample excess.

    ``n, y, se``: ``(k,)`` with ``k >= 2``. Returns ``{a, a_se, b, b_se, k}`` (SEs from the
    cells' own standard errors, not from the residuals: with ``k = 2`` the line is exact).
    """
    n, y, se = (np.asarray(v, dtype=float) for v in (n, y, se))
    if n.size < 2 or np.unique(n).size < 2:
        raise ValueError("extrapolate_inv_n needs cells at two or more distinct n")
    X = np.stack([np.ones_like(n), 1.0 / n], axis=1)  # (k, 2)
    W = 1.0 / se**2
    cov = np.linalg.inv(X.T @ (W[:, None] * X))
    a, b = cov @ (X.T @ (W * y))
    return {"a": float(a), "a_se": float(math.sqrt(cov[0, 0])), "b": float(b), "b_se": float(math.sqrt(cov[1, 1])),
            "k": int(n.size)}



def delta_se(fn, samples, rel_step: float = 1e-6) -> tuple[float, float]:
    """``fn(mean of samples)`` and its delta-method standard error.

    ``samples``: ``(R, k)`` per-replication vectors whose means ``fn`` combines (e.g. the
    simulated ``tr Cov`` at several ``lam``); the gradient is taken by central differences.
    SE ``= sqrt(grad^T Cov(samples) grad / R)``.
    """
    X = np.asarray(samples, dtype=float)
    R = X.shape[0]
    mu = X.mean(axis=0)
    val = float(fn(mu))
    grad = np.empty(mu.size)
    for j in range(mu.size):
        h = rel_step * max(abs(mu[j]), 1e-12)
        up, dn = mu.copy(), mu.copy()
        up[j] += h
        dn[j] -= h
        grad[j] = (fn(up) - fn(dn)) / (2 * h)
    C = np.atleast_2d(np.cov(X, rowvar=False, ddof=1))
    return val, float(np.sqrt(max(grad @ C @ grad, 0.0) / R))


def wilson(k, n, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval ``(lo, hi)`` for a binomial proportion ``k / n`` (arrays broadcast);
    unlike ``p +- z se`` it stays inside [0, 1] and is informative at ``k = 0``."""
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    p = k / n
    den = 1.0 + z**2 / n
    mid = (p + z**2 / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / den
    return np.clip(mid - half, 0.0, 1.0), np.clip(mid + half, 0.0, 1.0)
