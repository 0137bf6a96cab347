"""Per-pair scores, Hessians and the sandwich covariance as a quadratic in ``lam``.

docs/method.md section 3. For the logistic loss the per-pair score (gradient of
``l(delta, q)`` in ``theta``) is ``(sigma(delta) - q) X`` and the per-pair
Hessian ``sigma(delta)(1 - sigma(delta)) X X^T``, whatever ``q`` is.

The VR score of one labelled prompt is ``psi = a + lam * b`` with

- ``a = (s - Z) X``: the BT-MLE score of the labelled pair,
- ``b = -(s - g) X + (1/M) sum_m (s_m - g_m) X_m``: the correction (the second
  part only when the extra pairs share the prompt),

and with fresh prompts each extra pair contributes ``lam * c``,
``c = (s_j - g_j) X_j``, independently of the labelled pairs. Hence

    n Cov(theta_hat) ~ A (S0 + lam S1 + lam^2 S2) A,   A = H^-1,

``S0 = Cov(a)``, ``S1 = Cov(a, b) + Cov(b, a)``,
``S2 = Cov(b) + (n / N) Cov(c)`` (the last term for fresh prompts only).
:class:`VarianceParts` holds ``(A, S0, S1, S2)``; the estimator's sandwich
(:func:`vrpo.fit_bt`), its power-tuned ``lam`` and the population theory in
``analysis`` all go through :meth:`VarianceParts.cov` and
:meth:`VarianceParts.lam_opt`, so they cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit

__all__ = ["margins", "pair_score", "pair_hessian", "xtwx", "wcov", "VarianceParts"]


def margins(theta, X):
    """``delta = X theta``: ``theta (..., d)``, ``X (..., rows, d)`` -> ``(..., rows)``."""
    return np.matmul(X, np.asarray(theta)[..., None])[..., 0]


def pair_score(theta, X, q):
    """Per-pair logistic score ``(sigma(X theta) - q) X``.

    ``theta``: ``(..., d)``; ``X``: ``(..., rows, d)``; ``q``: ``(..., rows)``.
    Returns ``(..., rows, d)``.
    """
    s = expit(margins(theta, X))  # (..., rows)
    return (s - q)[..., None] * X


def xtwx(X, v, chunk_bytes=2**21):
    """``sum_rows v_r x_r x_r^T``: ``X (..., rows, d)``, ``v (..., rows)`` -> ``(..., d, d)``.

    Computed over chunks of the leading axis so the weighted copy stays in cache.
    """
    X = np.asarray(X)
    if X.ndim < 3:
        return np.matmul(np.swapaxes(X, -1, -2), v[..., None] * X)
    lead = X.shape[:-2]
    Xf = X.reshape((-1,) + X.shape[-2:])
    vf = np.broadcast_to(v, X.shape[:-1]).reshape((-1, X.shape[-2]))
    B = max(1, chunk_bytes // (8 * X.shape[-1] * X.shape[-2]))
    out = np.concatenate([
        np.matmul(np.swapaxes(Xf[i:i + B], -1, -2), vf[i:i + B, :, None] * Xf[i:i + B])
        for i in range(0, Xf.shape[0], B)
    ])
    return out.reshape(lead + out.shape[-2:])


def pair_hessian(theta, X, w=None):
    """Weighted mean of per-pair Hessians ``sigma(1-sigma) X X^T``.

    ``X``: ``(..., rows, d)``; ``w``: ``(..., rows)`` non-negative weights summing to
    one (``None``: equal weights). Returns ``(..., d, d)``.
    """
    s = expit(margins(theta, X))
    v = s * (1.0 - s)  # (..., rows)
    v = v / X.shape[-2] if w is None else v * w
    return xtwx(X, v)


def wcov(u, v=None, w=None):
    """Centred (cross-)covariance over the ``rows`` axis, divisor ``sum w`` (ddof 0).

    ``u, v``: ``(..., rows, d)``; ``w``: ``(..., rows)`` weights summing to one, or
    ``None`` for equal weights. Returns ``(..., d, d)`` = ``E[u v^T] - E[u] E[v]^T``.
    ddof 0 makes the BT-MLE sandwich equal statsmodels' HC0 covariance.
    """
    same = v is None
    v = u if same else v
    if w is None:
        rows = u.shape[-2]
        uw = u / rows
        mu, mv = u.mean(axis=-2), (None if same else v.mean(axis=-2))
    else:
        uw = u * w[..., None]
        mu = uw.sum(axis=-2)
        mv = None if same else np.sum(v * w[..., None], axis=-2)
    mv = mu if same else mv
    return np.matmul(np.swapaxes(uw, -1, -2), v) - mu[..., :, None] * mv[..., None, :]


def _psd(V):
    """``V`` with negative eigenvalues set to 0 where there are any.

    The meat ``S0 + lam S1 + lam^2 S2`` is the covariance of ``a + lam b`` plus
    ``(n/N) lam^2 Cov(c)``, positive semi-definite in exact arithmetic; when it is
    (nearly) singular, e.g. one labelled pair, rounding can leave eigenvalues of
    order ``-1e-16 |V|`` that would make a variance negative. Only the affected
    matrices are decomposed. NaN matrices pass through.
    """
    if V.shape[-1] == 0:
        return V
    ok = np.isfinite(V).all(axis=(-2, -1))
    if not ok.any():
        return V
    w = np.full(V.shape[:-1], np.inf)
    w[ok] = np.linalg.eigvalsh(V[ok])
    bad = w.min(axis=-1) < 0
    if bad.any():
        ev, Q = np.linalg.eigh(V[bad])
        V = V.copy()
        P = (Q * np.clip(ev, 0.0, None)[..., None, :]) @ np.swapaxes(Q, -1, -2)
        V[bad] = 0.5 * (P + np.swapaxes(P, -1, -2))
    return V


def _inv_psd(H):
    """Inverse of a batch of symmetric positive (semi)definite matrices.

    Falls back to the pseudo-inverse for singular members (degenerate designs),
    so the result is always finite; callers flag those fits separately.
    """
    try:
        return np.linalg.inv(H)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(H, hermitian=True)


@dataclass(frozen=True)
class VarianceParts:
    """``n Cov(theta_hat) = A (S0 + lam S1 + lam^2 S2) A`` for a batch of fits.

    Attributes (all ``(..., d, d)``): ``A`` the inverse Hessian, ``S0 = Cov(a)``,
    ``S1 = Cov(a,b) + Cov(b,a)``, ``S2 = Cov(b) + (n/N) Cov(c)``; ``n`` the number
    of labelled prompts the covariance is scaled by.
    """

    A: np.ndarray
    S0: np.ndarray
    S1: np.ndarray
    S2: np.ndarray
    n: int

    @classmethod
    def from_scores(cls, H, a, b=None, c=None, n_over_N=0.0, w=None, w_c=None):
        """Build the parts from per-prompt scores.

        ``H``: ``(..., d, d)`` Hessian; ``a, b``: ``(..., n, d)`` labelled-prompt
        scores (``b`` the correction, ``None`` when there is no auxiliary model);
        ``c``: ``(..., N, d)`` fresh-prompt extra-pair scores or ``None``;
        ``n_over_N``: ratio of labelled to fresh prompts; ``w``/``w_c``: optional
        weights (population theory); with weights, ``n`` is set to 1 so that
        :meth:`cov` returns the asymptotic ``V`` itself.
        """
        A = _inv_psd(H)
        S0 = wcov(a, None, w)
        if b is None:
            S1 = np.zeros_like(S0)
            S2 = np.zeros_like(S0)
        else:
            Cab = wcov(a, b, w)
            S1 = Cab + np.swapaxes(Cab, -1, -2)
            S2 = wcov(b, None, w)
        if c is not None:
            S2 = S2 + n_over_N * wcov(c, None, w_c)
        n = 1 if w is not None else a.shape[-2]
        return cls(A=A, S0=S0, S1=S1, S2=S2, n=n)

    def sigma(self, lam):
        """Meat ``S0 + lam S1 + lam^2 S2``; ``lam`` scalar or ``(...,)``."""
        lam = np.asarray(lam, dtype=float)[..., None, None]
        return self.S0 + lam * self.S1 + lam**2 * self.S2

    def V(self, lam):
        """Asymptotic covariance ``A Sigma(lam) A`` (so ``Cov(theta_hat) ~ V / n``)."""
        return self.A @ self.sigma(lam) @ self.A

    def cov(self, lam):
        """Estimated ``Cov(theta_hat) = V(lam) / n``, symmetrised. ``(..., d, d)``."""
        V = self.V(lam) / self.n
        return _psd(0.5 * (V + np.swapaxes(V, -1, -2)))

    def _quad(self, coord=None):
        """Coefficients ``(q1, q2)`` of ``tr(A Sigma A) = q0 + q1 lam + q2 lam^2``."""
        if coord is None:
            t = lambda S: np.trace(self.A @ S @ self.A, axis1=-2, axis2=-1)  # noqa: E731
        else:
            t = lambda S: (self.A @ S @ self.A)[..., coord, coord]  # noqa: E731
        return t(self.S1), t(self.S2)

    def lam_opt(self, coord=None, clip=(0.0, 1.0), rtol=1e-12):
        """Power-tuned ``lam`` minimising ``tr V(lam)`` (or ``V[coord, coord]``).

        ``lam* = -tr(A S1 A) / (2 tr(A S2 A))`` (PPI++), clipped to ``clip``
        (``None``: unclipped). ``lam* = 0`` where the correction carries no variance,
        ``tr(A S2 A) <= rtol tr(A S0 A)`` (e.g. ``g`` equal to the fit's own
        ``sigma(delta)``, where both traces are solver round-off and their ratio
        would be noise). Returns ``(...,)``.
        """
        q1, q2 = self._quad(coord)
        if coord is None:
            q0 = np.trace(self.A @ self.S0 @ self.A, axis1=-2, axis2=-1)
        else:
            q0 = (self.A @ self.S0 @ self.A)[..., coord, coord]
        ok = q2 > rtol * np.abs(q0)
        with np.errstate(divide="ignore", invalid="ignore"):
            lam = np.where(ok, -q1 / (2.0 * np.where(ok, q2, 1.0)), 0.0)
        if clip is not None:
            lam = np.clip(lam, *clip)
        return lam
