"""Does a fit have a finite minimiser? A certificate for "yes", an LP for "no, because".

Every objective of :func:`vrpo.fit_bt` is, per replication (see :mod:`vrpo.fit`),

    F(theta) = sum_r [ c_r softplus(x_r . theta) - t_r x_r . theta ] + ridge/2 |theta|^2,

convex when every ``c_r >= 0`` (``0 <= lam <= 1``). A solver's stopping rule cannot tell
a minimiser from a separated sample: once every margin is large the gradient underflows
and any rule fires. Two checks replace trust in the stopping rule:

1. :func:`certify` (every fit, ``O(d^3)`` per replication). In coordinates scaled by
   ``D = sqrt(diag H)``, with ``eps = |D^-1 grad|``, ``mu = lambda_min(D^-1 H D^-1)`` and
   ``L >= max_r |D^-1 x_r|``, the logistic curvature cannot fall faster than
   ``exp(-L s)`` along a unit direction (``sigma'(a + t) >= exp(-|t|) sigma'(a)``), so
   ``F(theta + s u) - F(theta) >= -eps s + mu (s/L - (1 - exp(-L s))/L^2)``. At
   ``s = 1/L`` this is positive when ``eps < mu / (e L)``: then ``F`` is larger on the
   whole sphere of radius ``1/L`` than at its centre, and by convexity a finite
   minimiser lies inside. A separated sample has none, so it can never pass.
2. :func:`diagnose` (only fits that fail the certificate): why not. With
   ``N(v) = sum_r (c_r/2) |x_r . v|`` and ``b = sum_r (c_r/2 - t_r) x_r``, the objective's
   asymptotic slope along ``v`` is ``rho(v) = b . v + N(v)``; it has no minimiser iff some
   ``v`` has ``rho(v) <= 0`` and ``b . v < 0`` (the objective keeps decreasing along
   ``v``). One LP decides it (``min b . v`` subject to ``rho(v) <= 0``, ``|v|_inf <= 1``);
   a second (``min rho(v)``) tells an objective unbounded below (possible only for
   ``lam > 0``) from separation. For BT-MLE with 0/1 labels this is Konis' (2007)
   separation LP. Directions with ``N(v) = 0`` and ``b . v = 0`` leave ``F`` constant:
   a rank-deficient design, reported separately.
"""

from __future__ import annotations

import numpy as np

__all__ = ["certify", "diagnose", "STATUS_HELP"]

#: what each value of ``FitResult.status`` means
STATUS_HELP = {
    "converged": "a finite minimiser, certified",
    "separable": "separable samples: a direction separates the labels (0/1 or soft), along which the objective "
                 "keeps decreasing, so no finite minimiser exists",
    "unbounded": "no finite minimiser: the objective is unbounded below (lam > 0: a poor g lets the linear "
                 "correction outgrow the curvature of the extra pairs and the (1 - lam)-weighted labelled pairs)",
    "rank_deficient": "zero or collinear feature columns: theta is not identified",
    "theta_max": "the iterates passed theta_max although no separating direction exists: a minimiser beyond "
                 "theta_max (badly scaled features? rescale X or raise theta_max)",
    "max_iter": "the Newton iteration limit was reached",
    "not_certified": "the stopping rule held but no minimiser could be certified there (numerically singular "
                     "Hessian); for lam > 1 (non-convex) a stationary point that is not a strict local minimum",
}

_CERT_MARGIN = 0.9  # safety factor on the certificate inequality (float rounding)
_RANK_RTOL = 1e-10  # lambda_min / lambda_max of the scaled Gram below which a design is rank deficient
_LP_TOL = 1e-9  # LP objective (on the standardised problem) below -_LP_TOL: a direction exists


def certify(grad, H, colmax, ridge=0.0, convex=True):
    """Certify a finite minimiser within ``1/L`` (scaled coordinates) of each fit.

    ``grad (R, d)`` and ``H (R, d, d)``: gradient and float64 Hessian of ``F`` at the
    returned ``theta`` (``H`` includes ``ridge``); ``colmax (R, d)``: ``max_r |x_rj|`` over
    the rows with curvature (any upper bound). ``convex=False`` (``lam > 1``) certifies a
    strict local minimum only (positive definite ``H``). Returns ``(R,)`` bool.
    """
    R, d = grad.shape
    diag = np.diagonal(H, axis1=1, axis2=2)
    ok = np.all(np.isfinite(H), axis=(1, 2)) & np.all(np.isfinite(grad), axis=1) & np.all(diag > 0, axis=1)
    D = np.sqrt(np.where(ok[:, None], diag, 1.0))  # (R, d)
    Hs = H / (D[:, :, None] * D[:, None, :])
    Hd = Hs - ridge * np.eye(d) / (D[:, :, None] * D[:, None, :])  # the data part (no ridge)
    with np.errstate(invalid="ignore"):
        mu = np.linalg.eigvalsh(0.5 * (Hd + np.swapaxes(Hd, 1, 2)))[:, 0]
        mu_all = np.linalg.eigvalsh(0.5 * (Hs + np.swapaxes(Hs, 1, 2)))[:, 0]
    if not convex:
        return ok & (mu_all > _RANK_RTOL)
    # at separated fits the curvature D is tiny and colmax / D overflows: L = inf gives
    # bound 0 (not certified), the right answer, so the overflow is not worth a warning
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        eps = np.linalg.norm(grad / D, axis=1)
        L = np.sqrt(np.sum((colmax / D) ** 2, axis=1))
        r_min = ridge / np.max(D**2, axis=1)
        bound = (np.exp(-1.0) * np.maximum(mu, 0.0) + 0.5 * r_min) / np.maximum(L, 1e-300)
    # mu_all <= _RANK_RTOL: numerically singular (condition number of the scaled Hessian
    # beyond ~1e10): no certificate, whatever the gradient says
    return ok & (eps < _CERT_MARGIN * bound) & (mu_all > _RANK_RTOL)


def _standardise(X):
    """Columns of ``X (rows, d)`` scaled to unit RMS (zero columns left as they are)."""
    s = np.sqrt(np.mean(X**2, axis=0))
    s[~(s > 0)] = 1.0
    return X / s


def diagnose(X, c, t):
    """Why one replication has no certified minimiser.

    ``X (rows, d)``; ``c (rows,) >= 0`` curvature and ``t (rows,)`` linear weights of its
    objective (all blocks stacked). Returns ``"unbounded"``, ``"separable"``,
    ``"rank_deficient"`` or ``None`` (a finite minimiser exists; the solver did not reach
    or could not certify it).
    """
    from scipy.optimize import linprog
    from scipy.sparse import csr_matrix, hstack, identity, vstack

    X = _standardise(np.asarray(X, dtype=float))
    rows, d = X.shape
    b = X.T @ (0.5 * c - t)  # (d,)
    cur = c > 0
    Xc = X[cur] * (0.5 * c[cur])[:, None]  # (rows+, d): N(v) = sum |Xc v|
    k = Xc.shape[0]
    # variables (v, u): u_r >= |Xc_r . v|  <=>  Xc v - u <= 0, -Xc v - u <= 0
    Id = identity(k, format="csr")
    A_abs = vstack([hstack([csr_matrix(Xc), -Id]), hstack([csr_matrix(-Xc), -Id])]).tocsr()
    zeros = np.zeros(2 * k)
    bounds = [(-1.0, 1.0)] * d + [(0.0, None)] * k
    scale = float(np.abs(b).sum() + np.abs(Xc).sum()) or 1.0
    # decreasing direction: min b.v  s.t.  b.v + sum u <= 0
    A = vstack([A_abs, csr_matrix(np.concatenate([b, np.ones(k)])[None, :])]).tocsr()
    obj = np.concatenate([b, np.zeros(k)])
    res = linprog(obj, A_ub=A, b_ub=np.concatenate([zeros, [0.0]]), bounds=bounds, method="highs")
    if res.status == 0 and res.fun < -_LP_TOL * scale:
        v = res.x[:d]
        rho = b @ v + np.abs(Xc @ v).sum()
        if rho < -_LP_TOL * scale:
            return "unbounded"
        # the found direction may not be the steepest: ask for the minimal slope
        res2 = linprog(np.concatenate([b, np.ones(k)]), A_ub=A_abs, b_ub=zeros, bounds=bounds, method="highs")
        if res2.status == 0 and res2.fun < -_LP_TOL * scale:
            return "unbounded"
        return "separable"
    G = Xc.T @ Xc if k else np.zeros((d, d))
    s = np.sqrt(np.maximum(np.diag(G), 0.0))
    if np.any(s == 0):
        return "rank_deficient"
    ev = np.linalg.eigvalsh(G / np.outer(s, s))
    if ev[0] <= _RANK_RTOL * ev[-1]:
        return "rank_deficient"
    return None
