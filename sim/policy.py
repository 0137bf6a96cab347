"""KL-regularised policies over a finite arm set, regret and win rate (docs/method.md s2, s4).

``pi(a|x) propto pi_ref(a|x) exp(r(x, a) / beta)`` is computed exactly over the
``K`` arms of each context. For any reward ``r``, the KL-regularised value
``J_r(pi) = E[r] - beta KL(pi || pi_ref)`` satisfies
``J_r(pi_r) - J_r(pi) = beta E_x KL(pi || pi_r)``, which is how regret is computed.
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax

__all__ = ["log_policy", "log_policy_linear", "regret", "win_rate", "LinearPolicies"]


def log_policy(reward, log_pi_ref, beta):
    """``log pi`` with ``pi propto pi_ref exp(reward / beta)``; ``reward, log_pi_ref (..., K)``."""
    return log_softmax(log_pi_ref + reward / beta, axis=-1)


def _log_softmax_inplace(x):
    """``log_softmax(x, axis=-1)`` overwriting ``x`` (float64, finite)."""
    x -= np.max(x, axis=-1, keepdims=True)
    lse = np.log(np.sum(np.exp(x), axis=-1, keepdims=True))
    x -= lse
    return x


def log_policy_linear(theta, phi, log_pi_ref, beta):
    """Policies of linear rewards ``theta . phi`` for a batch of ``theta``.

    ``theta (R, d)``, ``phi (E, K, d)``, ``log_pi_ref (E, K)`` -> ``(R, E, K)``.
    """
    E, K, d = phi.shape
    theta = np.asarray(theta, dtype=float)
    x = (theta @ phi.reshape(E * K, d).T).reshape(-1, E, K)  # (R, E, K): one BLAS product
    x /= beta
    x += log_pi_ref[None]
    if not np.all(np.isfinite(x)):
        return log_softmax(x, axis=-1)  # scipy handles infinities
    return _log_softmax_inplace(x)


def regret(log_pi, log_pi_opt, beta):
    """``beta E_x KL(pi || pi_opt)`` averaged over contexts; ``(..., E, K)`` -> ``(...)``."""
    pi = np.exp(log_pi)
    kl = np.sum(pi * (log_pi - log_pi_opt), axis=-1)  # (..., E)
    return beta * np.mean(np.maximum(kl, 0.0), axis=-1)


def win_rate(log_pi_a, log_pi_b, P):
    """``E_x sum_{a,b} pi_A(a|x) pi_B(b|x) p*(x, a, b)``.

    ``log_pi_a, log_pi_b (..., E, K)`` (broadcasting), ``P (E, K, K)`` with
    ``P[e, a, b] = p*(x_e, a, b)``. Returns ``(...)``.
    """
    pa, pb = np.exp(log_pi_a), np.exp(log_pi_b)
    E, K = P.shape[:2]
    if pb.ndim == 2 or (pb.ndim == 3 and pb.shape[0] == 1):  # one policy B for every A
        v = np.matmul(P, pb.reshape(E, K, 1))[..., 0]  # (E, K): sum_b P[e, a, b] pi_B(b|x_e)
        return np.mean(np.sum(pa * v, axis=-1), axis=-1)
    if pa.ndim == 3 and pb.ndim == 3 and pa.shape == pb.shape:
        # (E, R, K) @ (E, K, K): one small product per context instead of an einsum loop
        Pb = np.matmul(P, np.transpose(pb, (1, 2, 0)))  # (E, K, R): sum_b P[e, a, b] pi_B(b | x_e) per r
        return np.einsum("rea,ear->r", pa, Pb) / E
    return np.mean(np.einsum("...ea,eab,...eb->...e", pa, P, pb), axis=-1)


class LinearPolicies:
    """The KL-regularised policies of a batch of linear rewards on one evaluation set,
    computed once and shared by every metric (the runner's hot path).

    ``theta (R, d)``, ``phi (E, K, d)``, ``log_pi_ref (E, K)``. Holds the logits
    ``x = theta . phi / beta + log pi_ref`` ``(R, E, K)``, the policies ``pi = softmax(x)``
    and ``lse = log sum_k exp(x)`` ``(R, E)``, so ``log pi = x - lse`` is never formed:
    ``KL(pi || pi_opt) = sum_k pi x - lse - sum_k pi log pi_opt``. Equal to
    :func:`regret` / :func:`win_rate` on :func:`log_policy_linear` up to rounding.
    """

    def __init__(self, theta, phi, log_pi_ref, beta):
        E, K, d = phi.shape
        theta = np.asarray(theta, dtype=float)
        # in-place arithmetic throughout: the (R, E, K) arrays are megabytes, and every
        # temporary of that size costs more (page faults) than the arithmetic on it
        x = (theta @ phi.reshape(E * K, d).T).reshape(-1, E, K)  # (R, E, K)
        x /= beta
        x += log_pi_ref[None]
        hi, lo = (np.max(x), np.min(x)) if x.size else (0.0, 0.0)
        if np.isfinite(hi) and np.isfinite(lo) and hi - lo < 600.0:
            m = hi  # one shift for all rows: exp(x - m) neither overflows nor underflows to 0 rows
        else:
            m = np.max(x, axis=-1, keepdims=True)
        pi = np.subtract(x, m)
        np.exp(pi, out=pi)
        tot = np.sum(pi, axis=-1, keepdims=True)  # (R, E, 1)
        pi /= tot
        self.x, self.pi, self.beta = x, pi, beta
        self.lse = (m + np.log(tot))[..., 0]  # (R, E)
        self._neg_entropy = np.einsum("rek,rek->re", pi, x) - self.lse  # sum_k pi log pi

    def regret(self, log_pi_opt):
        """``beta E_x KL(pi || pi_opt)``, ``log_pi_opt (E, K)`` -> ``(R,)`` (as :func:`regret`)."""
        kl = self._neg_entropy - np.einsum("rek,ek->re", self.pi, log_pi_opt)
        return self.beta * np.mean(np.maximum(kl, 0.0), axis=-1)

    def win_rate_vs_fixed(self, P_pi_b):
        """Win rate against one policy B for all replications, given ``P_pi_b[e, a] =
        sum_b p*(x_e, a, b) pi_B(b|x_e)`` ``(E, K)``; ``(R,)``."""
        return np.mean(np.einsum("rek,ek->re", self.pi, P_pi_b), axis=-1)

    def opponent(self, P):
        """``(E, K, R)``: ``sum_b p*(x_e, a, b) pi_r(b|x_e)``, these policies as the opponents B."""
        return np.matmul(P, np.transpose(self.pi, (1, 2, 0)))

    def win_rate_vs(self, opponent):
        """Win rate against per-replication opponents from :meth:`opponent`; ``(R,)``."""
        return np.einsum("rea,ear->r", self.pi, opponent) / self.pi.shape[1]
