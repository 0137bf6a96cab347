"""Synthetic contextual bandit: contexts, arm features and a known reference policy.

A context is a vector ``x`` in R^dx together with the features ``phi(x, a)`` in
R^d of its ``K`` arms (drawn i.i.d. standard normal per context and arm, so
different prompts offer different responses). ``pi_ref(a|x)`` is uniform or a
softmax of a fixed linear score (``"softmax:t"``, temperature-like ``t``). The
true utility direction ``theta_0`` has norm ``scale``: larger ``scale`` means
sharper labels (small ``p*(1-p*)``).

All structural parameters (``theta_0``, the ``pi_ref`` score, every scenario's
own parameters) come from :meth:`Bandit.structural_rng`, a deterministic
function of ``seed`` and a tag, so they are identical in every replication and
worker.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from scipy.special import log_softmax


@dataclass(frozen=True)
class BanditSpec:
    """Structure of the bandit (validated on construction)."""

    d: int = 4
    K: int = 8
    dx: int = 4
    scale: float = 6.0
    beta: float = 1.0
    pi_ref: str = "uniform"
    seed: int = 0

    def __post_init__(self):
        if self.d < 1 or self.K < 2 or self.dx < 1:
            raise ValueError(f"need d >= 1, K >= 2, dx >= 1; got d={self.d}, K={self.K}, dx={self.dx}")
        if not (self.scale > 0 and np.isfinite(self.scale)):
            raise ValueError(f"scale must be a positive number, got {self.scale!r}")
        if not (self.beta > 0 and np.isfinite(self.beta)):
            raise ValueError(f"beta must be a positive number, got {self.beta!r}")
        _parse_pi_ref(self.pi_ref)


def _parse_pi_ref(spec: str) -> float:
    """Return the softmax temperature-like weight of ``pi_ref`` (0 for uniform)."""
    if spec == "uniform":
        return 0.0
    name, _, arg = spec.partition(":")
    if name == "softmax":
        try:
            t = float(arg) if arg else 1.0
        except ValueError:
            raise ValueError(f"pi_ref 'softmax:t' needs a number t, got {spec!r}") from None
        if not np.isfinite(t):
            raise ValueError(f"pi_ref softmax weight must be finite, got {spec!r}")
        return t
    raise ValueError(f"pi_ref must be 'uniform' or 'softmax:t', got {spec!r}")


@dataclass
class Contexts:
    """A batch of contexts: ``x (..., dx)``, ``phi (..., K, d)``, ``log_pi_ref (..., K)``."""

    x: np.ndarray
    phi: np.ndarray
    log_pi_ref: np.ndarray

    def __len__(self):
        return self.x.shape[0]

    @property
    def pi_ref(self) -> np.ndarray:
        return np.exp(self.log_pi_ref)


class Bandit:
    """A contextual bandit instance built from a :class:`BanditSpec`."""

    def __init__(self, spec: BanditSpec):
        self.spec = spec
        rng = self.structural_rng("theta_0")
        v = rng.standard_normal(spec.d)
        self.theta_0 = spec.scale * v / np.linalg.norm(v)  # (d,)
        w = self.structural_rng("pi_ref").standard_normal(spec.d)
        self.w_ref = w / np.linalg.norm(w)  # (d,)
        self._t_ref = _parse_pi_ref(spec.pi_ref)

    @property
    def d(self) -> int:
        return self.spec.d

    @property
    def K(self) -> int:
        return self.spec.K

    @property
    def beta(self) -> float:
        return self.spec.beta

    def structural_rng(self, tag: str) -> np.random.Generator:
        """Deterministic generator for structural parameter ``tag`` (same in every worker)."""
        return np.random.default_rng(np.random.SeedSequence([self.spec.seed, zlib.crc32(tag.encode())]))

    def log_pi_ref(self, phi: np.ndarray) -> np.ndarray:
        """``log pi_ref(a|x)`` from arm features ``phi (..., K, d)``; returns ``(..., K)``."""
        if self._t_ref == 0.0:
            return np.full(phi.shape[:-1], -np.log(phi.shape[-2]))
        return log_softmax(self._t_ref * phi @ self.w_ref, axis=-1)

    def sample_contexts(self, rng: np.random.Generator, size: int) -> Contexts:
        """``size`` i.i.d. contexts."""
        x = rng.standard_normal((size, self.spec.dx))  # (size, dx)
        phi = rng.standard_normal((size, self.spec.K, self.spec.d))  # (size, K, d)
        return Contexts(x=x, phi=phi, log_pi_ref=self.log_pi_ref(phi))

    @staticmethod
    def sample_arms(rng: np.random.Generator, log_pi: np.ndarray, shape: tuple) -> np.ndarray:
        """Draw arms from ``pi(.|x)`` for each context: ``log_pi (C, K)`` -> ``(C, *shape)`` ints."""
        cdf = np.cumsum(np.exp(log_pi), axis=-1)  # (C, K)
        cdf[:, -1] = 1.0
        u = rng.random((log_pi.shape[0], *shape))  # (C, *shape)
        flat = u.reshape(log_pi.shape[0], -1)  # (C, J)
        # idx = #{k: cdf_k <= u} (cdf[:, -1] = 1 > u is never counted)
        if cdf.shape[0] and np.all(cdf == cdf[:1]):  # one pi for every context (uniform pi_ref)
            idx = np.searchsorted(cdf[0, :-1], flat, side="right")
        else:
            idx = np.zeros(flat.shape, dtype=np.int64)
            for k in range(cdf.shape[1] - 1):
                idx += cdf[:, k : k + 1] <= flat
        return np.minimum(idx, log_pi.shape[-1] - 1).reshape(u.shape)
