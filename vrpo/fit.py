"""Batched BT-MLE and variance-reduced (VR / PPI++) estimators: :func:`fit_bt`.

METHOD.md section 2. For the logistic loss ``l(delta, q) = softplus(delta) - q delta``,
so every objective here is, per replication,

    F(theta) = sum_rows [ c_r softplus(x_r . theta) - t_r x_r . theta ] + ridge/2 |theta|^2

with labelled rows ``c = (1 - lam)/n``, ``t = (Z - lam g)/n`` and extra-pair rows
``c = lam / N_aux``, ``t = lam g_aux / N_aux`` (``N_aux = n M`` or ``N``). ``F`` is
convex for ``0 <= lam <= 1`` and is minimised by damped Newton, all replications
(the leading ``...`` axes) at once.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit
from scipy.stats import norm

from .separation import STATUS_HELP, certify, diagnose
from .variance import VarianceParts, _inv_psd, margins, pair_hessian, xtwx

__all__ = ["fit_bt", "fit_bt_population", "FitResult", "VRPOInputError", "ConvergenceWarning"]


class VRPOInputError(ValueError):
    """Raised for malformed estimator inputs (shapes, ranges, NaN, too few pairs)."""


class ConvergenceWarning(UserWarning):
    """Some replications did not converge (typically separable samples)."""


@dataclass
class FitResult:
    """Result of :func:`fit_bt` for a batch of replications.

    Attributes
    ----------
    theta : (..., d) point estimates.
    cov : (..., d, d) sandwich estimate of ``Cov(theta_hat)`` (= V / n), clustered by
        prompt when extra pairs share the labelled prompt.
    lam : (...,) the ``lam`` used (the power-tuned value for ``lam="auto"``).
    converged : (...,) bool; ``True`` only where a finite minimiser is *certified*
        near ``theta`` (:func:`vrpo.separation.certify`; for ``lam > 1``, where the
        objective is non-convex, a strict local minimiser), never merely because a
        stopping rule fired. ``False`` flags a fit without a finite minimiser or one
        that did not reach it; ``status`` says which. ``theta`` is then the last iterate
        with ``max|theta| <= theta_max`` (finite, not an estimate) and ``cov`` is NaN.
    status : (...,) str, one of :data:`vrpo.separation.STATUS_HELP`: ``"converged"``;
        ``"separable"`` (an LP finds a direction along which the objective keeps
        decreasing: separated labels, 0/1 or soft); ``"unbounded"`` (``lam > 0``: the
        objective is unbounded below in this sample, because the labelled pairs carry
        only ``1 - lam`` of the curvature and with a poor ``g`` the linear correction
        term dominates); ``"rank_deficient"`` (zero or collinear feature columns);
        ``"theta_max"`` (a minimiser beyond ``theta_max``: badly scaled features);
        ``"max_iter"``; ``"not_certified"``.
    n_iter : (...,) Newton iterations used (the final fit for ``lam="auto"``).
    hessian : (..., d, d) the Hessian estimate ``H_hat`` used in the sandwich: pooled
        over labelled and extra pairs, labelled pairs only where ``lam == 0``.
    parts : :class:`~vrpo.variance.VarianceParts` at ``theta``, from which
        ``cov`` was computed (``parts.cov(lam)`` for any other ``lam``).
    n : number of labelled pairs; aux : ``"none" | "same" | "fresh"``.
    """

    theta: np.ndarray
    cov: np.ndarray
    lam: np.ndarray
    converged: np.ndarray
    n_iter: np.ndarray
    hessian: np.ndarray
    parts: VarianceParts = field(repr=False)
    n: int = 0
    aux: str = "none"
    status: np.ndarray | None = None

    @property
    def se(self) -> np.ndarray:
        """Standard errors ``sqrt(diag(cov))``, ``(..., d)``."""
        return np.sqrt(np.clip(np.diagonal(self.cov, axis1=-2, axis2=-1), 0.0, None))

    def conf_int(self, alpha: float = 0.05) -> np.ndarray:
        """Two-sided Wald intervals ``theta +- z_{1-alpha/2} se``; ``(..., d, 2)``."""
        if not 0.0 < alpha < 1.0:
            raise VRPOInputError(f"alpha must be in (0, 1), got {alpha!r}")
        z = norm.ppf(1.0 - alpha / 2.0)
        half = z * self.se
        return np.stack([self.theta - half, self.theta + half], axis=-1)


# --------------------------------------------------------------------------- validation


def _as_float(name, a):
    """``a`` as a float64 array, or a :class:`VRPOInputError` naming what is wrong with it."""
    if a is None:
        raise VRPOInputError(f"{name} is required (got None)")
    try:
        arr = np.asarray(a)
    except (TypeError, ValueError) as e:
        raise VRPOInputError(f"{name} must be a numeric array: {e}") from None
    if np.iscomplexobj(arr):
        raise VRPOInputError(f"{name} is complex (dtype {arr.dtype}); fit_bt needs real numbers")
    if arr.dtype == object:
        if any(v is None for v in arr.flat):
            raise VRPOInputError(f"{name} must be a numeric array; it contains None")
        if any(isinstance(v, complex) for v in arr.flat):
            raise VRPOInputError(f"{name} is complex; fit_bt needs real numbers")
    if arr.dtype.kind not in "biuf":
        try:
            arr = arr.astype(float)
        except (TypeError, ValueError) as e:
            raise VRPOInputError(f"{name} must be a numeric array (got dtype {arr.dtype}): {e}") from None
    arr = arr.astype(float, copy=False)
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise VRPOInputError(f"{name} contains {bad} NaN or infinite value(s)")
    return arr


def _check_prob(name, a):
    if a.size and (a.min() < 0.0 or a.max() > 1.0):
        k = int(np.count_nonzero((a < 0.0) | (a > 1.0)))
        raise VRPOInputError(
            f"{name} must lie in [0, 1] (labels or probabilities); {k} value(s) outside, "
            f"range [{float(a.min())!r}, {float(a.max())!r}]"
        )


def _validate(X, Z, g, X_aux, g_aux, lam):
    X = _as_float("X", X)
    if X.ndim < 2:
        raise VRPOInputError(f"X must have shape (..., n, d); got shape {X.shape}")
    *batch, n, d = X.shape
    batch = tuple(batch)
    if d < 1:
        raise VRPOInputError("X has no feature columns (d = 0)")
    if n < d:
        raise VRPOInputError(f"need at least d = {d} labelled pairs, got n = {n}")
    Z = _as_float("Z", Z)
    if Z.shape != X.shape[:-1]:
        raise VRPOInputError(f"Z must have shape {X.shape[:-1]} (X.shape[:-1]); got {Z.shape}")
    _check_prob("Z", Z)

    if isinstance(lam, str):
        if lam != "auto":
            raise VRPOInputError(f"lam must be a number >= 0 or 'auto'; got {lam!r}")
    else:
        lam_arr = _as_float("lam", lam)
        if lam_arr.ndim > 0 and lam_arr.shape != batch:
            raise VRPOInputError(f"array lam must have the batch shape {batch}; got {lam_arr.shape}")
        if np.any(lam_arr < 0):
            raise VRPOInputError(f"lam must be >= 0; got {lam!r}")
        if np.all(lam_arr == 0):
            return X, Z, None, None, None, "none", 0.0
        lam = lam_arr

    if g is None or X_aux is None or g_aux is None:
        missing = [k for k, v in (("g", g), ("X_aux", X_aux), ("g_aux", g_aux)) if v is None]
        raise VRPOInputError(f"lam != 0 needs the auxiliary model and extra pairs; missing {', '.join(missing)}")
    g = _as_float("g", g)
    if g.shape != Z.shape:
        raise VRPOInputError(f"g must have the shape of Z {Z.shape}; got {g.shape}")
    _check_prob("g", g)
    X_aux = _as_float("X_aux", X_aux)
    g_aux = _as_float("g_aux", g_aux)
    if X_aux.shape[-1:] != (d,):
        raise VRPOInputError(f"X_aux must end in the feature axis d = {d}; got shape {X_aux.shape}")
    if X_aux.ndim == X.ndim + 1:
        mode = "same"
        if X_aux.shape[:-2] != X.shape[:-1]:
            raise VRPOInputError(
                f"X_aux for same-prompt pairs must have shape (..., n, M, d) = {X.shape[:-1] + ('M', d)}; got {X_aux.shape}"
            )
        if X_aux.shape[-2] < 1:
            raise VRPOInputError("X_aux has M = 0 extra pairs per prompt")
    elif X_aux.ndim == X.ndim:
        mode = "fresh"
        if X_aux.shape[:-2] != batch:
            raise VRPOInputError(
                f"X_aux for fresh prompts must have shape (..., N, d) with batch shape {batch}; got {X_aux.shape}"
            )
        if X_aux.shape[-2] < 1:
            raise VRPOInputError("X_aux has N = 0 extra pairs")
    else:
        raise VRPOInputError(
            f"X_aux must have shape (..., n, M, d) (same prompts) or (..., N, d) (fresh prompts); got {X_aux.shape}"
        )
    if g_aux.shape != X_aux.shape[:-1]:
        raise VRPOInputError(f"g_aux must have shape {X_aux.shape[:-1]} (X_aux.shape[:-1]); got {g_aux.shape}")
    _check_prob("g_aux", g_aux)
    return X, Z, g, X_aux, g_aux, mode, lam


# --------------------------------------------------------------------------- objective


@dataclass
class _Blocks:
    """Rows of the objective for W replications: lists of ``(XT, c, t)``.

    ``XT (W, d, rows)`` is stored transposed and C-contiguous so that the margin,
    gradient and Hessian products are single batched BLAS calls over contiguous rows.
    """

    XT: list  # each (W, d, rows) float64
    c: list  # each (W, rows)
    t: list  # each (W, rows)
    XT32: list  # float32 copies of XT, for the Hessian

    @classmethod
    def from_rows(cls, Xs, cs, ts):
        XT = [np.ascontiguousarray(np.swapaxes(x, 1, 2)) for x in Xs]
        return cls(XT, list(cs), list(ts), [x.astype(np.float32) for x in XT])

    def take(self, idx):
        return _Blocks(*([a[idx] for a in arrs] for arrs in (self.XT, self.c, self.t, self.XT32)))

    def slice(self, i, j):
        return _Blocks(*([a[i:j] for a in arrs] for arrs in (self.XT, self.c, self.t, self.XT32)))


def _objective_blocks(X, Z, g, Xa, ga, lam):
    """Rows of ``F`` (module docstring); ``lam``: ``(R,)``; arrays flattened to R."""
    n = X.shape[1]
    lam_ = lam[:, None]
    if Xa is None:
        return _Blocks.from_rows([X], [np.full(Z.shape, 1.0 / n)], [Z / n])
    Na = Xa.shape[1]
    return _Blocks.from_rows(
        [X, Xa],
        [np.broadcast_to((1.0 - lam_) / n, Z.shape), np.broadcast_to(lam_ / Na, ga.shape)],
        [(Z - lam_ * g) / n, lam_ * ga / Na],
    )


_CACHE_BYTES = 2**21  # per-chunk working set of _eval (fits in L2 on common CPUs)


def _eval(blocks, theta, ridge, order):
    """Objective value, gradient (order>=1) and Hessian (order>=2) per replication.

    Evaluated over chunks of replications small enough to stay in cache (the
    products are memory-bound; chunking is about 2x faster than one pass).
    """
    W, d = theta.shape
    rows = sum(x.shape[2] for x in blocks.XT)
    B = max(1, _CACHE_BYTES // (8 * d * rows))
    if B >= W:
        return _eval_dense(blocks, theta, ridge, order)
    out = [
        _eval_dense(blocks.slice(i, i + B), theta[i:i + B], ridge, order)
        for i in range(0, W, B)
    ]
    return tuple(None if z[0] is None else np.concatenate(z) for z in zip(*out))


def _eval_dense(blocks, theta, ridge, order):
    f = 0.5 * ridge * np.sum(theta**2, axis=-1)
    grad = ridge * theta if order >= 1 else None
    hess = None
    if order >= 2:
        hess = np.broadcast_to(ridge * np.eye(theta.shape[-1]), theta.shape + theta.shape[-1:]).copy()
    for XT, c, t, XT32 in zip(blocks.XT, blocks.c, blocks.t, blocks.XT32):
        delta = np.matmul(theta[:, None, :], XT)[:, 0, :]  # (W, rows)
        softplus = np.maximum(delta, 0.0) + np.log1p(np.exp(-np.abs(delta)))
        f = f + np.sum(c * softplus - t * delta, axis=-1)
        if order >= 1:
            with np.errstate(over="ignore"):
                s = 1.0 / (1.0 + np.exp(-delta))  # sigmoid; exp overflow gives the exact limit 0
            grad = grad + np.matmul(XT, (c * s - t)[..., None])[..., 0]  # (W, d)
        if order >= 2:
            # The Hessian only steers Newton's steps (the fixed point is set by the
            # float64 gradient), so it is formed in float32: half the memory traffic.
            w = (c * s * (1.0 - s)).astype(np.float32)  # (W, rows)
            hess = hess + np.matmul(XT32 * w[:, None, :], np.swapaxes(XT32, 1, 2)).astype(float)  # (W, d, d)
    return f, grad, hess


def _newton_step(grad, hess):
    """``-H^-1 grad`` with a tiny ridge so singular Hessians stay solvable."""
    d = grad.shape[-1]
    scale = np.trace(hess, axis1=1, axis2=2)[:, None, None] / d
    jitter = 1e-12 * np.maximum(scale, 1e-300)
    try:
        return -np.linalg.solve(hess + jitter * np.eye(d), grad[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return -np.matmul(np.linalg.pinv(hess, hermitian=True), grad[..., None])[..., 0]


def _armijo(f_new, f, alpha, slope):
    return np.isfinite(f_new) & (f_new <= f + 1e-4 * alpha * slope + 1e-15 * np.abs(f))


# why _newton stopped, per replication
_STOP_RULE, _STOP_THETA_MAX, _STOP_MAX_ITER, _STOP_LINE_SEARCH = 0, 1, 2, 3


def _newton(blocks, theta0, ridge, tol, max_iter, theta_max=1e6):
    """Damped Newton with Armijo backtracking, batched over replications.

    Each iteration evaluates value, gradient and Hessian once, at the full Newton
    step; only replications failing the Armijo test backtrack. Converged when the
    step satisfies ``max|step| <= tol (1 + max|theta|)``; a replication whose next
    full step would take ``max|theta|`` past ``theta_max`` stops at its last iterate
    as not converged (unbounded objective), as does one whose line search fails. Finished replications are
    dropped from the working set once they are the majority. Returns
    ``(theta, converged, n_iter, grad, stop)``: ``grad`` the gradient at ``theta``,
    ``stop`` why each replication stopped (``_STOP_*``). ``converged`` means only that
    the stopping rule fired; :func:`vrpo.separation.certify` decides whether a
    minimiser is there.
    """
    R, d = theta0.shape
    theta = theta0.astype(float).copy()
    converged = np.zeros(R, dtype=bool)
    n_iter = np.zeros(R, dtype=int)
    grad_out = np.zeros((R, d))
    stop_why = np.full(R, _STOP_MAX_ITER)
    widx = np.arange(R)  # replications held in `work`
    work = blocks
    th = theta.copy()  # (W, d)
    live = np.ones(R, dtype=bool)  # (W,) still iterating
    f, grad, hess = _eval(work, th, ridge, 2)
    for it in range(1, max_iter + 1):
        step = _newton_step(grad, hess)
        slope = np.sum(grad * step, axis=-1)
        bad = ~(slope < 0)  # non-descent (possible only for lam > 1): gradient step
        step[bad] = -grad[bad]
        slope[bad] = -np.sum(grad[bad] ** 2, axis=-1)
        # A full step beyond theta_max means the objective is unbounded below along a
        # direction (separation for the MLE; for lam > 0 also a finite-sample property
        # of L_VR): stop that replication at its last iterate instead of stepping.
        over = live & (np.max(np.abs(th + step), axis=-1) > theta_max)
        step[~live | over] = 0.0
        slope[~live | over] = 0.0
        cand = th + step
        fc, gc, hc = _eval(work, cand, ridge, 2)
        ok = ~live | _armijo(fc, f, 1.0, slope)
        failed = np.zeros_like(live)
        alpha = np.ones(len(th))
        back = np.flatnonzero(~ok)
        if back.size:
            sub = work.take(back)
            a = np.full(back.size, 0.5)
            need = np.arange(back.size)
            for _ in range(50):
                b = back[need]
                f2, _, _ = _eval(sub.take(need), th[b] + a[need, None] * step[b], ridge, 0)
                good = _armijo(f2, f[b], a[need], slope[b])
                need = need[~good]
                if need.size == 0:
                    break
                a[need] *= 0.5
            failed[back[need]] = True
            a[need] = 0.0
            alpha[back] = a
            cand[back] = th[back] + a[:, None] * step[back]
            f2, g2, h2 = _eval(sub, cand[back], ridge, 2)
            fc[back], gc[back], hc[back] = f2, g2, h2
        moved = np.max(np.abs(alpha[:, None] * step), axis=-1)
        th, f, grad, hess = cand, fc, gc, hc
        n_iter[widx[live]] = it
        done = live & ~failed & ((moved <= tol * (1.0 + np.max(np.abs(th), axis=-1))) | (np.abs(slope) < 1e-30))
        done &= ~over
        stop = done | (live & (failed | over))
        converged[widx[done]] = True
        stop_why[widx[done]] = _STOP_RULE
        stop_why[widx[live & over]] = _STOP_THETA_MAX
        stop_why[widx[live & failed & ~over]] = _STOP_LINE_SEARCH
        live &= ~stop
        theta[widx] = th
        grad_out[widx] = grad
        if not live.any():
            break
        if live.sum() <= 0.5 * len(widx):
            keep = np.flatnonzero(live)
            work, widx, th = work.take(keep), widx[keep], th[keep]
            f, grad, hess, live = f[keep], grad[keep], hess[keep], live[keep]
    return theta, converged, n_iter, grad_out, stop_why


# --------------------------------------------------------------------------- scores


def _cov_scaled(X, u, v):
    """``Cov(u X, v X)`` over rows for per-row scalars ``u, v (R, rows)``, ``X (R, rows, d)``.

    Equals ``wcov(u[..., None] * X, v[..., None] * X)`` without forming the scores.
    """
    rows = X.shape[1]
    mu = np.matmul(u[:, None, :], X)[:, 0, :] / rows  # (R, d)
    mv = mu if v is u else np.matmul(v[:, None, :], X)[:, 0, :] / rows
    return xtwx(X, u * v / rows) - mu[:, :, None] * mv[:, None, :]


def _lab_where_lam0(H_pooled, H_lab, lam):
    if lam is None:
        return H_pooled
    return np.where((np.asarray(lam) == 0)[:, None, None], H_lab, H_pooled)


def _variance_parts(theta, X, Z, g, Xa, ga, mode, ridge, lam=None):
    """``(parts, H)`` of :func:`_sandwich` (the sandwich ingredients and its Hessian)."""
    return _sandwich(theta, X, Z, g, Xa, ga, mode, ridge, lam)[:2]


def _sandwich(theta, X, Z, g, Xa, ga, mode, ridge, lam=None):
    """Sandwich ingredients at ``theta`` (flattened R); see :mod:`vrpo.variance`.

    Scores: ``a = (s - Z) X``, ``b = -(s - g) X [+ mean_m (s_m - g_m) X_m]``,
    ``c = (s_j - g_j) X_j``. The Hessian is pooled over labelled and extra pairs
    (all drawn from the same distribution), except for replications with
    ``lam == 0`` (``lam``: ``(R,)`` or None), which use the labelled pairs only,
    so a fit at ``lam = 0`` (fixed, or power-tuned to 0) is exactly BT-MLE.

    Returns ``(parts, H, H_obj)``: ``H_obj`` is the float64 Hessian of the objective
    at ``theta`` (``(1 - lam) H_lab + lam H_aux + ridge``; BT-MLE's where ``lam`` is None).
    """
    R, n, d = X.shape
    s = expit(margins(theta, X))  # (R, n)
    ra = s - Z
    H_lab = xtwx(X, s * (1.0 - s) / n)  # (R, d, d)
    eye = ridge * np.eye(d)
    if mode == "none":
        H = H_lab + eye
        S0 = _cov_scaled(X, ra, ra)
        zero = np.zeros_like(S0)
        return VarianceParts(A=_inv_psd(H), S0=S0, S1=zero, S2=zero, n=n), H, H
    rb = -(s - g)
    if mode == "same":
        M = Xa.shape[2]
        Xa_flat = Xa.reshape(R, n * M, d)
        sa = expit(margins(theta, Xa_flat))  # (R, nM)
        H_aux = xtwx(Xa_flat, sa * (1.0 - sa) / (n * M))
        e = np.einsum("rnm,rnmd->rnd", (sa - ga.reshape(R, n * M)).reshape(R, n, M), Xa) / M  # cluster by prompt
        a = ra[..., None] * X  # (R, n, d)
        b = rb[..., None] * X + e
        H = _lab_where_lam0((H_lab + M * H_aux) / (1.0 + M) + eye, H_lab + eye, lam)
        return VarianceParts.from_scores(H, a, b), H, _objective_hessian(H_lab, H_aux, eye, lam)
    N = Xa.shape[1]
    sa = expit(margins(theta, Xa))  # (R, N)
    rc = sa - ga
    H_aux = xtwx(Xa, sa * (1.0 - sa) / N)
    H = _lab_where_lam0((n * H_lab + N * H_aux) / (n + N) + eye, H_lab + eye, lam)
    Cab = _cov_scaled(X, ra, rb)
    S2 = _cov_scaled(X, rb, rb) + (n / N) * _cov_scaled(Xa, rc, rc)
    parts = VarianceParts(A=_inv_psd(H), S0=_cov_scaled(X, ra, ra), S1=Cab + np.swapaxes(Cab, 1, 2), S2=S2, n=n)
    return parts, H, _objective_hessian(H_lab, H_aux, eye, lam)


def _objective_hessian(H_lab, H_aux, eye, lam):
    if lam is None:
        return H_lab + eye
    lam = np.asarray(lam, dtype=float)[:, None, None]
    return (1.0 - lam) * H_lab + lam * H_aux + eye


# --------------------------------------------------------------------------- public API


def fit_bt(
    X,
    Z,
    g=None,
    X_aux=None,
    g_aux=None,
    lam=1.0,
    *,
    ridge: float = 0.0,
    lam_coord: int | None = None,
    tol: float = 1e-10,
    max_iter: int = 100,
    theta0=None,
    theta_max: float = 1e6,
    warn: bool = True,
) -> FitResult:
    """Fit the BT reward ``theta`` by BT-MLE, VR or power-tuned VR, batched.

    Parameters
    ----------
    X : (..., n, d) margin features ``phi(x, y1) - phi(x, y2)`` of the labelled pairs.
    Z : (..., n) labels in [0, 1] (1: ``y1`` preferred; soft labels, ties as 0.5).
    g : (..., n) auxiliary probabilities ``g(x, y1, y2)`` on the labelled pairs.
    X_aux, g_aux : extra unlabelled pairs from ``pi_ref``: ``(..., n, M, d)`` /
        ``(..., n, M)`` when they share the labelled prompts (covariance clustered
        by prompt), or ``(..., N, d)`` / ``(..., N)`` from fresh prompts.
    lam : ``0`` is BT-MLE (``g`` and extra pairs ignored); ``1`` the paper's VR
        estimator; ``"auto"`` the PPI++ power-tuned value minimising the estimated
        ``tr V`` (or ``V[lam_coord, lam_coord]``), clipped to [0, 1], computed at a
        BT-MLE pilot; an array of the batch shape gives one ``lam`` per replication.
        ``lam > 1`` is allowed but the objective may then be non-convex.
    ridge : L2 penalty ``ridge/2 |theta|^2`` on the (mean-normalised) objective;
        0 (default) means none.
    lam_coord : with ``lam="auto"``, tune for coordinate ``lam_coord`` (an integer in
        ``[-d, d)``) instead of the trace.
    tol, max_iter : Newton stopping rule (step ``<= tol (1 + |theta|_inf)``).
    theta0 : (d,) or (..., d) starting point (default zeros), ``max|theta0| <= theta_max``.
    theta_max : bound on ``max|theta|``: a replication whose next step would pass it
        stops there, flagged (no finite minimiser, or one beyond the bound).
    warn : emit a :class:`ConvergenceWarning` when replications have no certified minimiser.

    Leading ``...`` axes are independent replications solved together (an empty batch
    gives empty results).

    Returns
    -------
    FitResult with ``theta (..., d)``, ``cov (..., d, d)``, ``lam (...,)``,
    ``converged (...,)``, ``status (...,)``, ``n_iter``, ``hessian`` and ``conf_int(alpha)``.
    ``converged`` is ``True`` only where a finite minimiser is certified
    (:mod:`vrpo.separation`); elsewhere ``cov`` is NaN and ``status`` names the cause.
    """
    X, Z, g, Xa, ga, mode, lam_v = _validate(X, Z, g, X_aux, g_aux, lam)
    if not (np.isfinite(ridge) and ridge >= 0):
        raise VRPOInputError(f"ridge must be a finite number >= 0; got {ridge!r}")
    if not (isinstance(theta_max, (int, float, np.integer, np.floating)) and np.isfinite(theta_max) and theta_max > 0):
        raise VRPOInputError(f"theta_max must be a finite number > 0; got {theta_max!r}")
    *batch, n, d = X.shape
    batch = tuple(batch)
    if lam_coord is not None:
        if isinstance(lam_coord, (bool, np.bool_)) or not isinstance(lam_coord, (int, np.integer)) or not (
            -d <= lam_coord < d
        ):
            raise VRPOInputError(f"lam_coord must be an integer in [0, {d}) (or [-{d}, 0) from the end); got {lam_coord!r}")
        lam_coord = int(lam_coord) % d
    R = int(np.prod(batch)) if batch else 1
    if theta0 is None:
        th0 = np.zeros((R, d))
    else:
        t0 = _as_float("theta0", theta0)
        if t0.shape not in ((d,), batch + (d,)):
            raise VRPOInputError(f"theta0 must have shape ({d},) or {batch + (d,)}; got {t0.shape}")
        if t0.size and np.max(np.abs(t0)) > theta_max:
            raise VRPOInputError(
                f"theta0 has max|theta0| = {np.max(np.abs(t0)):g} > theta_max = {theta_max:g}; start inside the bound"
            )
        th0 = np.broadcast_to(t0, batch + (d,)).reshape(R, d).copy()
    if R == 0:
        return _empty_result(batch, d, n, mode, lam_v)
    Xf = X.reshape(R, n, d)
    Zf = Z.reshape(R, n)
    gf = g.reshape(R, n) if g is not None else None
    if Xa is not None:
        Xaf = Xa.reshape((R,) + Xa.shape[len(batch):])
        gaf = ga.reshape((R,) + ga.shape[len(batch):])
    else:
        Xaf = gaf = None
    if mode == "same":
        M = Xaf.shape[2]
        Xa_rows, ga_rows = Xaf.reshape(R, n * M, d), gaf.reshape(R, n * M)
    else:
        Xa_rows, ga_rows = Xaf, gaf
    colmax_lab = np.max(np.abs(Xf), axis=1)  # (R, d): bounds |x_r| in the certificate
    colmax_aux = None if Xa_rows is None else np.max(np.abs(Xa_rows), axis=1)

    status_p = None  # the BT-MLE pilot's status where it decides the fit (lam="auto")
    if mode == "none":
        lam_f = np.zeros(R)
    else:
        # BT-MLE pilot on the labelled pairs: the starting point of the VR fit (cheap,
        # n rows only) and, for lam="auto", where the PPI++ lam is estimated.
        zero = np.zeros(R)
        pilot, stop_p, _, grad_p, why_p = _newton(_objective_blocks(Xf, Zf, None, None, None, zero), th0, ridge, tol,
                                                  max_iter, theta_max)
        if isinstance(lam_v, str):
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                parts, _, H_p = _sandwich(pilot, Xf, Zf, gf, Xaf, gaf, mode, ridge)
                lam_f = parts.lam_opt(coord=lam_coord)
            cert_p = stop_p & certify(grad_p, H_p, colmax_lab, ridge)
            status_p = _status(cert_p, why_p, zero, Xf, Zf, None, None, None)
            lam_f = np.where(cert_p, lam_f, 0.0)
            th0 = np.where(cert_p[:, None], pilot, th0)
        else:
            lam_f = np.broadcast_to(lam_v, batch).reshape(R).astype(float)
            # a pilot that did not stop normally is a poor start; those start from theta0
            th0 = np.where(stop_p[:, None], pilot, th0)

    blocks = _objective_blocks(Xf, Zf, gf, Xa_rows, ga_rows, lam_f)
    theta, stopped, n_iter, grad, why = _newton(blocks, th0, ridge, tol, max_iter, theta_max)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        parts, H, H_obj = _sandwich(theta, Xf, Zf, gf, Xaf, gaf, mode, ridge, lam_f)
        cov = parts.cov(lam_f)
    colmax = colmax_lab if colmax_aux is None else np.where(
        (lam_f == 0)[:, None], colmax_lab, np.where((lam_f == 1)[:, None], colmax_aux, np.maximum(colmax_lab, colmax_aux)))
    convex = lam_f <= 1.0
    cert = stopped & certify(grad, H_obj, colmax, ridge)
    if not convex.all():
        cert = np.where(convex, cert, stopped & certify(grad, H_obj, colmax, ridge, convex=False))
    status = _status(cert, why, lam_f, Xf, Zf, gf, Xa_rows, ga_rows)
    if status_p is not None:
        status = np.where(status_p != "converged", status_p, status)
    converged = status == "converged"
    # No minimiser, no sandwich: the covariance of a non-converged fit is NaN by
    # definition (flagged in .converged/.status and by the warning), never a meaningless number.
    cov[~converged] = np.nan
    if warn and not np.all(converged):
        warnings.warn(_warning_text(status, R, max_iter, theta_max), ConvergenceWarning, stacklevel=2)

    def unflat(a, tail=()):
        return a.reshape(batch + tail)

    parts_out = VarianceParts(
        A=unflat(parts.A, (d, d)), S0=unflat(parts.S0, (d, d)), S1=unflat(parts.S1, (d, d)),
        S2=unflat(parts.S2, (d, d)), n=parts.n,
    )
    return FitResult(
        theta=unflat(theta, (d,)),
        cov=unflat(cov, (d, d)),
        lam=unflat(lam_f),
        converged=unflat(converged),
        n_iter=unflat(n_iter),
        hessian=unflat(H, (d, d)),
        parts=parts_out,
        n=n,
        aux=mode,
        status=unflat(status),
    )


def _rows(r, lam, X, Z, g, Xa_rows, ga_rows):
    """Replication ``r``'s objective as stacked rows ``(X (rows, d), c (rows,), t (rows,))``."""
    n = X.shape[1]
    lam_r = float(lam[r])
    Xs, cs, ts = [X[r]], [np.full(n, (1.0 - lam_r) / n)], [(Z[r] - (lam_r * g[r] if lam_r else 0.0)) / n]
    if Xa_rows is not None and lam_r != 0:
        Na = Xa_rows.shape[1]
        Xs.append(Xa_rows[r])
        cs.append(np.full(Na, lam_r / Na))
        ts.append(lam_r * ga_rows[r] / Na)
    return np.concatenate(Xs), np.concatenate(cs), np.concatenate(ts)


def _status(cert, why, lam, X, Z, g, Xa_rows, ga_rows):
    """``(R,)`` status strings: certified fits are ``"converged"``; the others are
    diagnosed by the LP (:func:`vrpo.separation.diagnose`, convex objectives only)."""
    status = np.full(cert.shape, "converged", dtype="<U14")
    for r in np.flatnonzero(~cert):
        cause = None
        if lam[r] <= 1.0:
            cause = diagnose(*_rows(r, lam, X, Z, g, Xa_rows, ga_rows))
        if cause is None:
            cause = {_STOP_THETA_MAX: "theta_max", _STOP_MAX_ITER: "max_iter"}.get(int(why[r]), "not_certified")
        status[r] = cause
    return status


def _warning_text(status, R, max_iter, theta_max):
    counts = {k: int(np.sum(status == k)) for k in STATUS_HELP if k != "converged" and np.any(status == k)}
    k = sum(counts.values())
    parts = "; ".join(f"{v} {s} ({STATUS_HELP[s].replace('theta_max', f'theta_max = {theta_max:g}')})"
                      .replace("iteration limit", f"iteration limit ({max_iter})") for s, v in counts.items())
    return (f"fit_bt: {k} of {R} replication(s) have no certified finite minimiser: {parts}. "
            "They are flagged in .converged and .status; their cov is NaN")


def _empty_result(batch, d, n, mode, lam_v):
    z = lambda *tail: np.zeros(batch + tail)  # noqa: E731
    lam = np.zeros(batch) if isinstance(lam_v, str) or mode == "none" else np.broadcast_to(lam_v, batch).astype(float)
    return FitResult(theta=z(d), cov=z(d, d), lam=lam, converged=np.zeros(batch, dtype=bool),
                     n_iter=np.zeros(batch, dtype=int), hessian=z(d, d),
                     parts=VarianceParts(A=z(d, d), S0=z(d, d), S1=z(d, d), S2=z(d, d), n=n), n=n, aux=mode,
                     status=np.zeros(batch, dtype="<U14"))


def fit_bt_population(X, q, w=None, *, ridge: float = 0.0, tol: float = 1e-12, max_iter: int = 200):
    """BT projection of a (weighted) population: ``argmin sum_r w_r l(x_r . theta, q_r)``.

    ``X (rows, d)``, ``q (rows,)`` probabilities ``p*`` (or labels), ``w (rows,)``
    non-negative weights (default equal; normalised to sum to one). This defines
    ``theta*`` (METHOD.md s2). Raises ``VRPOInputError`` if it does not converge
    (``p*`` separable by a BT model, e.g. deterministic preferences).
    """
    X = _as_float("X", X)
    q = _as_float("q", q)
    if X.ndim != 2 or q.shape != X.shape[:1]:
        raise VRPOInputError(f"need X (rows, d) and q (rows,); got {X.shape} and {q.shape}")
    _check_prob("q", q)
    w = np.full(q.shape, 1.0) if w is None else _as_float("w", w)
    if w.shape != q.shape or np.any(w < 0) or w.sum() <= 0:
        raise VRPOInputError("w must be non-negative with the shape of q and a positive sum")
    w = w / w.sum()
    blocks = _Blocks.from_rows([X[None]], [w[None]], [(w * q)[None]])
    theta, conv, _, grad, _ = _newton(blocks, np.zeros((1, X.shape[1])), ridge, tol, max_iter)
    H = pair_hessian(theta[0], X, w)[None] + ridge * np.eye(X.shape[1])
    if not (conv[0] and certify(grad, H, np.max(np.abs(X), axis=0)[None], ridge)[0]):
        raise VRPOInputError("population BT fit did not converge: p* is (nearly) separable by a BT model")
    return theta[0]
