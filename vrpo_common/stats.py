"""Monte Carlo statistics, once: every simulated or resampled number the suite reports
goes through these, so each carries its standard error and replication count.

All functions take replications along axis 0.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["Z95", "mean_se", "mean_ci", "sq_dev", "trace_cov_se", "paired_ratio"]

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
