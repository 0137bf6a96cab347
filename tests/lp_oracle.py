"""Independent linear-programming oracles for "this sample has no finite minimiser".

Used by the separation and property tests as the reference the estimator is checked
against; written from the textbook definitions, not from ``vrpo``'s own diagnosis:

- :func:`separable_labels` (BT-MLE, ``lam = 0``): Konis (2007)'s LP for logistic
  regression, extended to soft labels. A direction ``v`` separates the sample when
  ``x_i . v >= 0`` for ``Z_i = 1``, ``<= 0`` for ``Z_i = 0`` and ``= 0`` for
  ``0 < Z_i < 1``, with ``sum_i y_i x_i . v > 0`` (``y = 2Z - 1`` on the 0/1 rows).
- :func:`no_minimiser` (any convex objective ``sum_r c_r softplus(x_r . v) - t_r x_r . v``
  with ``c_r >= 0``): the primal recession LP with explicit positive and negative
  parts ``a = a_plus - a_minus``: along ``v`` the objective's asymptotic slope is
  ``sum_r (c_r - t_r) a_plus_r + t_r a_minus_r``; no minimiser exists iff a ``v`` makes
  that slope ``<= 0`` while the objective is not constant along ``v``.

Both return ``True`` only for a direction that is re-verified in float64 after the LP,
so LP tolerances cannot invent a separation.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linprog

VERIFY_TOL = 1e-9  # float64 re-check of the LP's direction, relative to |x| |v|
GAIN_TOL = 1e-6  # the direction must decrease the objective by this much (relative)


def _standardise(X):
    scale = np.sqrt(np.mean(X**2, axis=0))
    scale[scale == 0] = 1.0
    return X / scale


def separable_labels(X, Z) -> bool:
    """``X (n, d)``, ``Z (n,)`` in [0, 1]: does a direction separate the labels?"""
    X = _standardise(np.asarray(X, float))
    Z = np.asarray(Z, float)
    n, d = X.shape
    hard = (Z == 0) | (Z == 1)
    y = np.where(Z == 1, 1.0, -1.0)
    # maximise sum_hard y x.v  s.t.  -y x.v <= 0 (hard rows), x.v = 0 (soft rows), |v| <= 1
    c = -(y[hard, None] * X[hard]).sum(0)
    A_ub = -(y[hard, None] * X[hard]) if hard.any() else None
    b_ub = np.zeros(int(hard.sum())) if hard.any() else None
    A_eq = X[~hard] if (~hard).any() else None
    b_eq = np.zeros(int((~hard).sum())) if (~hard).any() else None
    res = linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=[(-1, 1)] * d, method="highs")
    if res.status != 0 or -res.fun <= GAIN_TOL * max(1.0, np.abs(X).sum()):
        return False
    v = res.x
    a = X @ v
    tol = VERIFY_TOL * np.linalg.norm(X, axis=1) * np.linalg.norm(v)
    ok = np.where(hard, y * a >= -tol, np.abs(a) <= tol)
    return bool(ok.all())


def no_minimiser(X_rows, c, t) -> bool:
    """Rows ``X_rows (rows, d)``, curvature weights ``c (rows,) >= 0``, linear weights ``t``.

    ``True`` iff the LP finds (and float64 confirms) a direction ``v`` along which the
    objective decreases without end or keeps decreasing towards its infimum.
    """
    X = _standardise(np.asarray(X_rows, float))
    c, t = np.asarray(c, float), np.asarray(t, float)
    rows, d = X.shape
    # variables: v (d), a_plus (rows), a_minus (rows) with X v = a_plus - a_minus.
    # Step 1: minimise the slope over the box; a negative minimum: unbounded below.
    slope = np.concatenate([np.zeros(d), c - t, t])
    A_eq = np.hstack([X, -np.eye(rows), np.eye(rows)])
    b_eq = np.zeros(rows)
    bounds = [(-1, 1)] * d + [(0, None)] * (2 * rows)
    r1 = linprog(slope, A_eq=A_eq, b_eq=b_eq, bounds=bounds, method="highs")
    scale = max(1.0, float(np.sum((np.abs(c) + np.abs(t))[:, None] * np.abs(X))))
    if r1.status == 0 and r1.fun < -GAIN_TOL * scale:
        return _confirm(X, c, t, r1.x[:d], scale)
    # Step 2 (the minimum slope is 0): among directions with slope <= 0, maximise how much
    # the curved rows move, sum_{c_r > 0} c_r |a_r|; a positive maximum: the objective keeps
    # decreasing towards its infimum along that direction (separation).
    moving = np.concatenate([np.zeros(d), -c, -c])
    r2 = linprog(moving, A_ub=slope[None, :], b_ub=[0.0], A_eq=A_eq, b_eq=b_eq, bounds=bounds, method="highs")
    if r2.status == 0 and -r2.fun > GAIN_TOL * scale:
        return _confirm(X, c, t, r2.x[:d], scale)
    return False


def _confirm(X, c, t, v, scale) -> bool:
    """Float64 check: along ``v`` the asymptotic slope is ``<= 0`` and the objective moves."""
    a = X @ v
    slope = float(np.sum((c - t) * np.maximum(a, 0) + t * np.maximum(-a, 0)))
    moving = float(np.sum(c * np.abs(a)) + abs(np.sum(t[c == 0] * a[c == 0])))
    return slope <= VERIFY_TOL * scale and moving > GAIN_TOL * scale
