"""Batched BT-MLE and variance-reduced (VR / PPI++) estimators: :func:`fit_bt`.

docs/method.md section 2. For the logistic loss ``l(delta, q) = softplus(delta) - q delta``,
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
from scipy.special import expit, ndtri

from .separation import STATUS_HELP, certify, diagnose
from .solver import (STOP_MAX_ITER, STOP_RULE, STOP_THETA_MAX, Blocks, Scratch, evaluate, gradient, minimise,
                     minimise_fast, newton_step_small, sigmoid_at)
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
        z = ndtri(1.0 - alpha / 2.0)  # the normal quantile (scipy.stats is a second of import time)
        half = z * self.se
        return np.stack([self.theta - half, self.theta + half], axis=-1)


# --------------------------------------------------------------------------- validation


def _as_float(name, a, check_finite=True):
    """``a`` as a float64 array, or a :class:`VRPOInputError` naming what is wrong with it.

    ``check_finite=False`` leaves the NaN/inf check to the caller (``X_aux``: checked
    chunk by chunk through the column maxima the fit computes anyway)."""
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
    if check_finite and not np.all(np.isfinite(arr)):
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
    X_aux = _as_float("X_aux", X_aux, check_finite=False)  # finiteness: see fit_bt (column maxima)
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


def _objective_blocks(X, Z, g, Xa, ga, lam):
    """Rows of ``F`` (module docstring) for flattened replications: ``X (R, n, d)``,
    ``Xa (R, N_aux, d)`` or None, ``lam (R,)``. A :class:`vrpo.solver.Blocks`."""
    n = X.shape[1]
    R = X.shape[0]
    if Xa is None:
        return Blocks.from_rows([X], [np.full(R, 1.0 / n)], [Z / n])
    Na = Xa.shape[1]
    lam_ = np.asarray(lam, dtype=float)[:, None]
    return Blocks.from_rows([X, Xa], [(1.0 - lam_) / n, lam_ / Na], [(Z - lam_ * g) / n, lam_ * ga / Na])


def _eval(blocks, theta, ridge, order):
    """Objective value, gradient (``order >= 1``) and Hessian (``order >= 2``) per
    replication: the evaluation the solver iterates on (:func:`vrpo.solver.evaluate`)."""
    return evaluate(blocks, theta, ridge, order)


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


# --------------------------------------------------------------------------- the fit, chunk by chunk

_CHUNK_BYTES = 2**22  # rows of one chunk of replications (transposed copies): stays in cache (L2/L3)
_PILOT_FIXED_LAM = False  # fixed lam: start at the BT-MLE pilot? (measured: no faster than theta0 = 0)


class _NonFinite(Exception):
    """A chunk met NaN or infinite features (reported by :func:`fit_bt` with a count)."""


class _Outputs:
    """Per-replication results of :func:`_fit_chunk`, filled chunk by chunk."""

    def __init__(self, R, d):
        z = lambda *shape: np.zeros((R,) + shape)  # noqa: E731
        self.theta, self.grad, self.colmax_lab, self.colmax_aux = z(d), z(d), z(d), z(d)
        self.A, self.S0, self.S1, self.S2, self.H, self.H_obj = (z(d, d) for _ in range(6))
        self.lam = z()
        self.stop = np.zeros(R, dtype=int)
        self.n_iter = np.zeros(R, dtype=int)
        self.pilot_cert = np.ones(R, dtype=bool)
        self.pilot_stop = np.zeros(R, dtype=int)


def _colmax(XT):
    """``max_rows |x_rj|``, ``(W, d)`` (NaN propagates, so it doubles as a finiteness check)."""
    return np.maximum(np.max(XT, axis=2), -np.min(XT, axis=2))


def _fit_chunk(*args):
    """Fit replications ``sl`` (pilot, lam, VR fit, sandwich) while their rows are in cache."""
    with np.errstate(over="ignore"):  # sigmoid's exp(-delta) overflows to the exact limit
        _fit_chunk_body(*args)


def _fit_chunk_body(out, sl, X, Z, g, Xa_rows, ga_rows, mode, lam_fixed, th0, ridge, tol, max_iter, theta_max,
                    lam_coord, have_theta0, scratch):
    n, d = X.shape[1:]
    Zc = Z[sl]
    W = Zc.shape[0]
    XT = scratch("XT", (W, d, n))
    np.copyto(XT, np.swapaxes(X[sl], 1, 2))  # (W, d, n) transposed rows, in reused memory
    out.colmax_lab[sl] = _colmax(XT)
    start = th0[sl]
    if mode == "none":
        B = Blocks.from_rows([XT], [np.full(W, 1.0 / n)], [Zc / n], transposed=True)
        lam = np.zeros(W)
        theta, stop, it, fin = _solve(
            B, start, ridge, tol, max_iter, theta_max, scratch,
            lambda r, th: _final_chunk(th, XT[r], Zc[r], None, None, None, mode, lam[r], ridge, scratch))
    else:
        gc, gac = g[sl], ga_rows[sl]
        XTa = scratch("XTa", (W, d, Xa_rows.shape[1]))
        np.copyto(XTa, np.swapaxes(Xa_rows[sl], 1, 2))  # (W, d, N_aux)
        out.colmax_aux[sl] = _colmax(XTa)
        if not np.all(np.isfinite(out.colmax_aux[sl])):
            raise _NonFinite("X_aux")
        Na = XTa.shape[2]
        if lam_fixed is None or (_PILOT_FIXED_LAM and not have_theta0):
            # BT-MLE pilot on the labelled pairs (n rows): where lam="auto" is estimated,
            # and the starting point of the VR fit
            Bp = Blocks.from_rows([XT], [np.full(W, 1.0 / n)], [Zc / n], transposed=True)
            pilot, stop_p, _, fin_p = _solve(
                Bp, start, ridge, tol, max_iter, theta_max, scratch,
                lambda r, th: _final_chunk(th, XT[r], Zc[r], gc[r], XTa[r], gac[r], mode, None, ridge, scratch))
            if lam_fixed is None:
                with np.errstate(divide="ignore", invalid="ignore"):
                    lam = fin_p["parts"].lam_opt(coord=lam_coord)
                cert_p = (stop_p == STOP_RULE) & certify(fin_p["grad"], fin_p["H_obj"], out.colmax_lab[sl], ridge)
                out.pilot_cert[sl], out.pilot_stop[sl] = cert_p, stop_p
                lam = np.where(cert_p, lam, 0.0)
                start = np.where(cert_p[:, None], pilot, start)
            else:
                # a pilot that did not stop by the rule is a poor start: those keep theta0
                start = np.where((stop_p == STOP_RULE)[:, None], pilot, start)
        if lam_fixed is not None:
            lam = lam_fixed[sl]
        lam_ = lam[:, None]
        B = Blocks.from_rows([XT, XTa], [(1.0 - lam) / n, lam / Na], [(Zc - lam_ * gc) / n, lam_ * gac / Na],
                             transposed=True)
        theta, stop, it, fin = _solve(
            B, start, ridge, tol, max_iter, theta_max, scratch,
            lambda r, th: _final_chunk(th, XT[r], Zc[r], gc[r], XTa[r], gac[r], mode, lam[r], ridge, scratch))
    parts = fin["parts"]
    out.theta[sl], out.stop[sl], out.n_iter[sl], out.lam[sl] = theta, stop, it, lam
    out.grad[sl], out.H[sl], out.H_obj[sl] = fin["grad"], fin["H"], fin["H_obj"]
    out.A[sl], out.S0[sl], out.S1[sl], out.S2[sl] = parts.A, parts.S0, parts.S1, parts.S2


def _solve(B, start, ridge, tol, max_iter, theta_max, scratch, final):
    """Minimise one chunk's objective ``B`` and evaluate ``final`` at the result.

    :func:`vrpo.solver.minimise_fast`; where its last step was a chord step, the Newton
    step at the result (from the gradient and Hessian that ``final`` computes there
    anyway) must pass the stopping rule, or the replication is solved again by
    :func:`vrpo.solver.minimise` (a true Newton step last). ``final(r, theta_r)`` returns
    :func:`_final_chunk`'s dict for replications ``r`` (a slice or indices) at ``theta_r``.
    Returns ``(theta, stop, n_iter, fin)``.
    """
    theta, stop, it, chord = minimise_fast(B, start, ridge, tol, max_iter, theta_max, scratch)
    everything = slice(None)
    fin = final(everything, theta)
    redo = np.flatnonzero(chord & (stop == STOP_RULE) & ~newton_step_small(fin["grad"], fin["H_obj"], theta, tol))
    if redo.size:
        theta[redo], stop[redo], it[redo] = minimise(B.take(redo), start[redo], ridge, tol, max_iter, theta_max)
        again = final(redo, theta[redo])
        for key in ("grad", "H", "H_obj"):
            fin[key][redo] = again[key]
        for key in ("A", "S0", "S1", "S2"):
            getattr(fin["parts"], key)[redo] = getattr(again["parts"], key)
    return theta, stop, it, fin


def _centred_gram(U, work, rows):
    """Covariance over the last axis of scores ``U (W, k, rows)`` and their means ``(W, k)``.

    The scores are centred before the product (so the result is PSD up to rounding and
    exactly 0 for one row), the product taken between two equal copies (``U`` itself,
    centred in place, and ``work``): numpy sends ``U U^T`` on one buffer to BLAS syrk,
    measured 2.4x slower than gemm at these shapes."""
    mu = np.sum(U, axis=2) / rows  # (W, k)
    np.subtract(U, mu[:, :, None], out=work)
    U -= mu[:, :, None]
    return np.matmul(work, np.swapaxes(U, 1, 2)) / rows, mu


def _weighted_gram(XT, w, buf):
    """``XT diag(w) XT^T``: ``XT (W, d, rows)``, ``w (W, rows)`` -> ``(W, d, d)``; ``buf`` scratch like ``XT``."""
    return np.matmul(np.multiply(XT, w[:, None, :], out=buf), np.swapaxes(XT, 1, 2))


def _final_chunk(theta, XT, Z, g, XTa, ga, mode, lam, ridge, scratch=None):
    """Everything at the returned ``theta`` of a chunk, from the cached transposed rows.

    The sandwich of :func:`_sandwich` (same scores, same Hessian; shapes ``XT (W, d, n)``,
    ``XTa (W, d, N_aux)`` with the ``M`` extra pairs of prompt ``i`` in columns
    ``i M .. i M + M - 1``), the objective's float64 Hessian ``H_obj`` and gradient
    ``grad`` (BT-MLE's where ``lam`` is None). Covariances come from centred scores.
    ``scratch``: a :class:`vrpo.solver.Scratch` for the work arrays. Returns a dict of
    new arrays.
    """
    scratch = scratch or Scratch()
    W, d, n = XT.shape
    eye = ridge * np.eye(d)
    s = sigmoid_at(theta, XT, scratch("sig0", (W, 1, n)))  # (W, n)
    ra = s - Z
    U = scratch("rows0", (W, 2 * d, n))  # scores a (rows :d) and b (rows d:) of the labelled prompts
    work = scratch("U_work", (W, 2 * d, n))
    H_lab = _weighted_gram(XT, s * (1.0 - s) / n, work[:, :d])  # (W, d, d)
    if mode == "none" or g is None:
        S0, mu_a = _centred_gram(np.multiply(XT, ra[:, None, :], out=U[:, :d]), work[:, :d], n)
        H = H_lab + eye
        zero = np.zeros_like(H)
        grad = mu_a + ridge * theta
        return {"parts": VarianceParts(A=_inv_psd(H), S0=S0, S1=zero, S2=zero, n=n), "H": H, "H_obj": H, "grad": grad}
    Na = XTa.shape[2]
    sa = sigmoid_at(theta, XTa, scratch("sig1", (W, 1, Na)))  # (W, N_aux)
    rc = sa - ga
    rb = g - s  # -(s - g)
    # H_aux and E[rc^2 x x^T]: (W, 2, d, N_aux) weighted rows times the rows, as a batch of
    # d x d products (OpenBLAS measured 2.2x slower on one (2d x N_aux)(N_aux x d) product)
    buf = scratch("rows1", (W, 2, d, Na))
    np.multiply(XTa, (sa * (1.0 - sa) / Na)[:, None, :], out=buf[:, 0])
    mu_rc = np.matmul(XTa, rc[..., None])[..., 0] / Na  # (W, d): mean rc x
    np.multiply(XT, ra[:, None, :], out=U[:, :d])
    np.multiply(XT, rb[:, None, :], out=U[:, d:])
    XTa_T = np.swapaxes(XTa, 1, 2)  # (W, N_aux, d)
    if mode == "same":
        M = Na // n
        Uc = np.multiply(XTa, rc[:, None, :], out=buf[:, 1])  # extra-pair scores c
        U[:, d:] += Uc.reshape(W, d, n, M).sum(axis=3) / M  # mean_m rc x per prompt (clustered)
        H_aux = np.matmul(buf[:, 0], XTa_T)
        H_pool = (H_lab + M * H_aux) / (1.0 + M)
        mu_c = None
    else:
        np.multiply(XTa, (rc * rc)[:, None, :], out=buf[:, 1])
        G = np.matmul(buf, XTa_T[:, None])  # (W, 2, d, d): H_aux, N_aux E[rc^2 x x^T]
        H_aux = G[:, 0]
        mu_c = mu_rc
        # Cov(c) = E[rc^2 x x^T] - mu_c mu_c^T; with one extra pair exactly 0 (not rounding)
        C_c = np.where(Na > 1, G[:, 1] / Na - mu_c[:, :, None] * mu_c[:, None, :], 0.0)
        H_pool = (n * H_lab + Na * H_aux) / (n + Na)
    mu_b_lab = np.matmul(XT, rb[..., None])[..., 0] / n  # mean rb x (labelled rows only)
    C, mu = _centred_gram(U, work, n)  # (W, 2d, 2d)
    S0, Cab, S2 = C[:, :d, :d], C[:, :d, d:], C[:, d:, d:]
    if mu_c is not None:
        S2 = S2 + (n / Na) * C_c
    mu_a = mu[:, :d]
    S1 = Cab + np.swapaxes(Cab, 1, 2)
    if lam is None:  # the BT-MLE pilot: pooled Hessian in the sandwich, MLE objective
        H = H_pool + eye
        H_obj = H_lab + eye
        grad = mu_a + ridge * theta
    else:
        lam_ = lam[:, None, None]
        H = np.where(lam_ == 0, H_lab, H_pool) + eye
        H_obj = (1.0 - lam_) * H_lab + lam_ * H_aux + eye
        # grad of (1-lam)/n sum softplus - (Z - lam g)/n . delta + lam/Na sum (softplus - ga delta)
        #   = mean (s - Z) x + lam mean (g - s) x + lam mean (sa - ga) x
        grad = mu_a + lam[:, None] * (mu_b_lab + mu_rc) + ridge * theta
    parts = VarianceParts(A=_inv_psd(H), S0=S0, S1=S1, S2=S2, n=n)
    return {"parts": parts, "H": H, "H_obj": H_obj, "grad": grad}


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
    lam_fixed = None if isinstance(lam_v, str) else np.broadcast_to(lam_v, batch).reshape(R).astype(float)
    # Replications are solved in chunks small enough for their rows (transposed copies)
    # to stay in cache through every Newton iteration and the sandwich.
    per_rep = 8 * d * (n + (0 if Xa_rows is None else Xa_rows.shape[1]))
    W = int(max(1, min(R, _CHUNK_BYTES // per_rep)))
    out = _Outputs(R, d)
    scratch = Scratch()  # work arrays shared by the chunks
    try:
        for lo in range(0, R, W):
            sl = slice(lo, min(lo + W, R))
            _fit_chunk(out, sl, Xf, Zf, gf, Xa_rows, ga_rows, mode, lam_fixed, th0, ridge, tol, max_iter, theta_max,
                       lam_coord, theta0 is not None, scratch)
    except _NonFinite:
        _as_float("X_aux", Xa)  # raises, counting the NaN or infinite values
    lam_f = out.lam
    colmax = out.colmax_lab if Xa_rows is None else np.where(
        (lam_f == 0)[:, None], out.colmax_lab,
        np.where((lam_f == 1)[:, None], out.colmax_aux, np.maximum(out.colmax_lab, out.colmax_aux)))
    stopped = out.stop == STOP_RULE
    convex = lam_f <= 1.0
    cert = stopped & certify(out.grad, out.H_obj, colmax, ridge)
    if not convex.all():
        cert = np.where(convex, cert, stopped & certify(out.grad, out.H_obj, colmax, ridge, convex=False))
    status = _status(cert, out.stop, lam_f, Xf, Zf, gf, Xa_rows, ga_rows)
    if isinstance(lam_v, str):  # a power-tuned fit stands on its BT-MLE pilot
        pilot_ok = out.pilot_cert
        if not pilot_ok.all():
            status_p = _status(pilot_ok, out.pilot_stop, np.zeros(R), Xf, Zf, None, None, None)
            status = np.where(pilot_ok, status, status_p)
    converged = status == "converged"
    parts = VarianceParts(A=out.A, S0=out.S0, S1=out.S1, S2=out.S2, n=n)
    with np.errstate(over="ignore", invalid="ignore"):
        cov = parts.cov(lam_f)
    # No minimiser, no sandwich: the covariance of a non-converged fit is NaN by
    # definition (flagged in .converged/.status and by the warning), never a meaningless number.
    cov[~converged] = np.nan
    if warn and not np.all(converged):
        warnings.warn(_warning_text(status, R, max_iter, theta_max), ConvergenceWarning, stacklevel=2)
    theta, n_iter, H = out.theta, out.n_iter, out.H

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
            cause = {STOP_THETA_MAX: "theta_max", STOP_MAX_ITER: "max_iter"}.get(int(why[r]), "not_certified")
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


def fit_bt_population(X, q, w=None, *, ridge: float = 0.0, tol: float = 1e-12, max_iter: int = 200, theta0=None):
    """BT projection of a (weighted) population: ``argmin sum_r w_r l(x_r . theta, q_r)``.

    ``X (rows, d)``, ``q (rows,)`` probabilities ``p*`` (or labels), ``w (rows,)``
    non-negative weights (default equal; normalised to sum to one); ``theta0 (d,)`` an
    optional starting point (e.g. the fit on a subsample). This defines ``theta*``
    (docs/method.md s2). Raises ``VRPOInputError`` if no minimiser is certified (``p*``
    separable by a BT model, e.g. deterministic preferences).
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
    d = X.shape[1]
    start = np.zeros((1, d)) if theta0 is None else _as_float("theta0", theta0).reshape(1, d)
    B = Blocks.from_rows([X[None]], [w[None]], [(w * q)[None]])
    theta, stop, _ = minimise(B, start, ridge, tol, max_iter, 1e6)
    _, grad, H = evaluate(B, theta, ridge, 2)
    if not (stop[0] == STOP_RULE and certify(grad, H, np.max(np.abs(X), axis=0)[None], ridge)[0]):
        raise VRPOInputError("population BT fit did not converge: p* is (nearly) separable by a BT model")
    return theta[0]
