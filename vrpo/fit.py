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

from .variance import VarianceParts, _inv_psd, margins, xtwx

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
    converged : (...,) bool; ``False`` flags a fit without a finite minimiser or one
        that did not converge: separable samples (BT-MLE), or, for ``lam > 0``, an
        objective unbounded below in this sample (the labelled pairs carry only
        ``1 - lam`` of the curvature, none at ``lam = 1``, so with a poor ``g`` the
        linear correction term can dominate), or a non-convex objective
        (``lam > 1``). ``theta`` is then the last iterate with
        ``max|theta| <= 1e6`` (finite, not an estimate) and ``cov`` is NaN.
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
    try:
        arr = np.asarray(a, dtype=float)
    except (TypeError, ValueError) as e:
        raise VRPOInputError(f"{name} must be a numeric array: {e}") from None
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise VRPOInputError(f"{name} contains {bad} NaN or infinite value(s)")
    return arr


def _check_prob(name, a):
    if a.size and (a.min() < 0.0 or a.max() > 1.0):
        raise VRPOInputError(
            f"{name} must lie in [0, 1] (labels or probabilities); found values in [{a.min():.4g}, {a.max():.4g}]"
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


def _newton(blocks, theta0, ridge, tol, max_iter, theta_max=1e6):
    """Damped Newton with Armijo backtracking, batched over replications.

    Each iteration evaluates value, gradient and Hessian once, at the full Newton
    step; only replications failing the Armijo test backtrack. Converged when the
    step satisfies ``max|step| <= tol (1 + max|theta|)``; a replication whose next
    full step would take ``max|theta|`` past ``theta_max`` stops at its last iterate
    as not converged (unbounded objective), as does one whose line search fails. Finished replications are
    dropped from the working set once they are the majority. Returns
    ``(theta, converged, n_iter)``.
    """
    R, d = theta0.shape
    theta = theta0.astype(float).copy()
    converged = np.zeros(R, dtype=bool)
    n_iter = np.zeros(R, dtype=int)
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
        live &= ~stop
        theta[widx] = th
        if not live.any():
            break
        if live.sum() <= 0.5 * len(widx):
            keep = np.flatnonzero(live)
            work, widx, th = work.take(keep), widx[keep], th[keep]
            f, grad, hess, live = f[keep], grad[keep], hess[keep], live[keep]
    return theta, converged, n_iter


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
    """Sandwich ingredients at ``theta`` (flattened R); see :mod:`vrpo.variance`.

    Scores: ``a = (s - Z) X``, ``b = -(s - g) X [+ mean_m (s_m - g_m) X_m]``,
    ``c = (s_j - g_j) X_j``. The Hessian is pooled over labelled and extra pairs
    (all drawn from the same distribution), except for replications with
    ``lam == 0`` (``lam``: ``(R,)`` or None), which use the labelled pairs only,
    so a fit at ``lam = 0`` (fixed, or power-tuned to 0) is exactly BT-MLE.
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
        return VarianceParts(A=_inv_psd(H), S0=S0, S1=zero, S2=zero, n=n), H
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
        return VarianceParts.from_scores(H, a, b), H
    N = Xa.shape[1]
    sa = expit(margins(theta, Xa))  # (R, N)
    rc = sa - ga
    H_aux = xtwx(Xa, sa * (1.0 - sa) / N)
    H = _lab_where_lam0((n * H_lab + N * H_aux) / (n + N) + eye, H_lab + eye, lam)
    Cab = _cov_scaled(X, ra, rb)
    S2 = _cov_scaled(X, rb, rb) + (n / N) * _cov_scaled(Xa, rc, rc)
    return VarianceParts(A=_inv_psd(H), S0=_cov_scaled(X, ra, ra), S1=Cab + np.swapaxes(Cab, 1, 2), S2=S2, n=n), H


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
    tol, max_iter : Newton stopping rule (step ``<= tol (1 + |theta|_inf)``).
    theta0 : (..., d) starting point (default zeros).
    warn : emit a :class:`ConvergenceWarning` when replications fail to converge.

    Leading ``...`` axes are independent replications solved together.

    Returns
    -------
    FitResult with ``theta (..., d)``, ``cov (..., d, d)``, ``lam (...,)``,
    ``converged (...,)``, ``n_iter``, ``hessian`` and ``conf_int(alpha)``.
    """
    X, Z, g, Xa, ga, mode, lam_v = _validate(X, Z, g, X_aux, g_aux, lam)
    if ridge < 0 or not np.isfinite(ridge):
        raise VRPOInputError(f"ridge must be a finite number >= 0; got {ridge!r}")
    *batch, n, d = X.shape
    batch = tuple(batch)
    R = int(np.prod(batch)) if batch else 1
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
    th0 = np.zeros((R, d)) if theta0 is None else _as_float("theta0", np.broadcast_to(theta0, batch + (d,))).reshape(R, d)

    conv_p = np.ones(R, dtype=bool)
    if mode == "none":
        lam_f = np.zeros(R)
    else:
        # BT-MLE pilot on the labelled pairs: the starting point of the VR fit (cheap,
        # n rows only) and, for lam="auto", where the PPI++ lam is estimated.
        pilot, conv_p, _ = _newton(_objective_blocks(Xf, Zf, None, None, None, np.zeros(R)), th0, ridge, tol, max_iter)
        if isinstance(lam_v, str):
            parts, _ = _variance_parts(pilot, Xf, Zf, gf, Xaf, gaf, mode, ridge)
            lam_f = parts.lam_opt(coord=lam_coord)
            th0 = pilot
        else:
            lam_f = np.broadcast_to(lam_v, batch).reshape(R).astype(float)
            # a separated pilot is a poor start; those replications start from theta0
            th0 = np.where(conv_p[:, None], pilot, th0)
            conv_p = np.ones(R, dtype=bool)

    blocks = _objective_blocks(Xf, Zf, gf, Xa_rows, ga_rows, lam_f)
    theta, converged, n_iter = _newton(blocks, th0, ridge, tol, max_iter)
    converged &= conv_p
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        parts, H = _variance_parts(theta, Xf, Zf, gf, Xaf, gaf, mode, ridge, lam_f)
        cov = parts.cov(lam_f)
    # No minimiser, no sandwich: the covariance of a non-converged fit is NaN by
    # definition (flagged in .converged and by the warning), never a meaningless number.
    cov[~converged] = np.nan
    if warn and not np.all(converged):
        k = int(np.sum(~converged))
        warnings.warn(
            f"fit_bt: {k} of {R} replication(s) have no finite minimiser or did not converge in {max_iter} "
            "Newton steps: separable samples, or (lam > 0) an objective unbounded below because the "
            "labelled pairs carry weight (1 - lam) of the curvature and a poor g lets the linear "
            "correction term dominate. They are flagged in .converged; their cov is NaN",
            ConvergenceWarning,
            stacklevel=2,
        )

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
    )


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
    theta, conv, _ = _newton(blocks, np.zeros((1, X.shape[1])), ridge, tol, max_iter)
    if not conv[0]:
        raise VRPOInputError("population BT fit did not converge: p* is (nearly) separable by a BT model")
    return theta[0]
