"""The auxiliary-model zoo ``g`` (METHOD.md section 5).

An auxiliary model maps a batch of :class:`~sim.data.PairData` (leading
replication axis ``R``) to ``(g, g_aux)``, its probabilities that ``y1`` is
preferred on the labelled pairs ``(R, n)`` and on the extra pairs ``(R, ...)``.
It never sees the labels of the extra pairs; only ``learned`` and ``self`` see
the labelled ``Z`` (``learned`` through K-fold cross-fitting). Randomness comes
from the per-replication generators passed in, so results do not depend on how
replications are chunked.

Register a new one with::

    @register_aux("shrunk")
    class Shrunk(AuxModel):
        def predict(self, data, rngs):
            return 0.5 + 0.5 * (data.p - 0.5), 0.5 + 0.5 * (data.p_aux - 0.5)
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, logit

import vrpo

from .data import PairData
from .registry import AUX_MODELS, register_aux
from .scenarios import Scenario

__all__ = ["AuxModel", "make_aux", "AUX_MODELS", "quadratic_pair_features"]

_EPS = 1e-12


class AuxModel:
    """Base class. ``arg`` is the text after ``:`` in the spec (``None`` if absent)."""

    name = "aux"
    default_arg: str | None = None

    def __init__(self, arg: str | None, scenario: Scenario):
        self.arg = self.default_arg if arg is None else arg
        self.scenario = scenario
        self.setup()

    def setup(self) -> None:
        """Parse ``self.arg`` / draw structural parameters."""

    def predict(self, data: PairData, rngs: list[np.random.Generator]):
        raise NotImplementedError

    def __call__(self, data: PairData, rngs: list[np.random.Generator]):
        g, g_aux = self.predict(data, rngs)
        g, g_aux = np.asarray(g, dtype=float), np.asarray(g_aux, dtype=float)
        if g.shape != data.Z.shape or g_aux.shape != data.p_aux.shape:
            raise ValueError(f"auxiliary model {self.name!r} returned shapes {g.shape}, {g_aux.shape}; "
                             f"expected {data.Z.shape}, {data.p_aux.shape}")
        for nm, v in (("g", g), ("g_aux", g_aux)):
            if not np.all(np.isfinite(v)) or v.min() < 0 or v.max() > 1:
                raise ValueError(f"auxiliary model {self.name!r} produced {nm} outside [0, 1] or non-finite")
        return g, g_aux

    def _float_arg(self, lo=-np.inf):
        try:
            v = float(self.arg)
        except (TypeError, ValueError):
            raise ValueError(f"auxiliary model {self.name!r} needs a numeric argument, got {self.arg!r}") from None
        if not (np.isfinite(v) and v >= lo):
            raise ValueError(f"auxiliary model {self.name!r}: argument must be a finite number >= {lo}, got {v}")
        return v


def make_aux(spec: str, scenario: Scenario) -> AuxModel:
    """Build an auxiliary model from ``"name"`` or ``"name:arg"``."""
    name, arg = AUX_MODELS.parse(spec)
    return AUX_MODELS.get(name)(arg, scenario)


@register_aux("oracle")
class Oracle(AuxModel):
    """``g = p*``: the best possible annotator."""

    def predict(self, data, rngs):
        return data.p, data.p_aux


@register_aux("noisy")
class Noisy(AuxModel):
    """An imperfect LLM annotator: ``g = sigma(logit p* + s eps)``, ``eps ~ N(0,1)`` per pair."""

    default_arg = "1.0"

    def setup(self):
        self.s = self._float_arg(lo=0.0)

    def predict(self, data, rngs):
        out = []
        for r, rng in enumerate(rngs):
            lp = logit(np.clip(data.p[r], _EPS, 1 - _EPS))
            lpa = logit(np.clip(data.p_aux[r], _EPS, 1 - _EPS))
            out.append((expit(lp + self.s * rng.standard_normal(lp.shape)),
                        expit(lpa + self.s * rng.standard_normal(lpa.shape))))
        return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])


@register_aux("biased")
class Biased(AuxModel):
    """A wrong BT model: ``sigma(theta_b . (phi1 - phi2))`` with ``theta_b`` = ``theta_0``
    rotated by ``angle`` degrees (argument, default 60) in a fixed random plane."""

    default_arg = "60"

    def setup(self):
        ang = np.deg2rad(self._float_arg())
        th = self.scenario.theta_0
        t = th / np.linalg.norm(th)
        v = self.scenario.bandit.structural_rng("aux/biased").standard_normal(th.shape)
        v = v - (v @ t) * t
        v = v / np.linalg.norm(v) if np.linalg.norm(v) > 0 else v
        self.theta_b = np.linalg.norm(th) * (np.cos(ang) * t + np.sin(ang) * v)

    def predict(self, data, rngs):
        return expit(data.X @ self.theta_b), expit(data.X_aux @ self.theta_b)


@register_aux("constant")
class Constant(AuxModel):
    """``g = c`` (argument, default 1/2): carries no information."""

    default_arg = "0.5"

    def setup(self):
        self.c = self._float_arg(lo=0.0)
        if self.c > 1:
            raise ValueError(f"constant g must lie in [0, 1], got {self.c}")

    def predict(self, data, rngs):
        return np.full(data.Z.shape, self.c), np.full(data.p_aux.shape, self.c)


@register_aux("self")
class SelfG(AuxModel):
    """The pilot BT fit's own preference ``sigma(theta_mle . (phi1 - phi2))`` (the reference
    code's default "frozen policy" ``g``)."""

    def predict(self, data, rngs):
        fit = vrpo.fit_bt(data.X, data.Z, lam=0, warn=False)
        th = fit.theta  # (R, d)
        g = expit(np.einsum("rnd,rd->rn", data.X, th))
        Xa = data.X_aux
        ga = expit(np.einsum("r...d,rd->r...", Xa, th))
        return g, ga


def quadratic_pair_features(x, phi1, phi2):
    """Antisymmetric features ``h(x, phi1) - h(x, phi2)``, ``h = [phi, phi_i phi_j (i<=j), x (x) phi]``.

    Any model ``sigma(w . F)`` on them satisfies ``g(a, b) = 1 - g(b, a)``.
    Shapes ``(..., dx)``, ``(..., d)`` -> ``(..., d + d(d+1)/2 + dx d)``.
    """
    d = phi1.shape[-1]
    iu = np.triu_indices(d)

    def h(phi):
        quad = (phi[..., :, None] * phi[..., None, :])[..., iu[0], iu[1]]
        inter = (x[..., :, None] * phi[..., None, :]).reshape(phi.shape[:-1] + (-1,))
        return np.concatenate([phi, quad, inter], axis=-1)

    return h(phi1) - h(phi2)


@register_aux("learned")
class Learned(AuxModel):
    """A classifier fitted on the labelled data with K-fold cross-fitting (argument: K,
    default 5): ridge-logistic on :func:`quadratic_pair_features`. Labelled pair ``i`` and
    the extra pairs sharing its prompt get the model fitted without ``i``'s fold; extra
    pairs on fresh prompts get the average of the fold models."""

    default_arg = "5"
    ridge = 1e-2

    def setup(self):
        self.folds = int(self._float_arg(lo=2))

    def predict(self, data, rngs):
        F = quadratic_pair_features(data.x, data.phi1, data.phi2)  # (R, n, p)
        Fa = quadratic_pair_features(data.x_aux, data.phi1_aux, data.phi2_aux)  # (R, ..., p)
        R, n, _ = F.shape
        fold = np.arange(n) % self.folds
        g = np.empty((R, n))
        same = data.aux_prompts == "same"
        ga = np.empty(data.p_aux.shape) if same else np.zeros(data.p_aux.shape)
        for k in range(self.folds):
            tr, te = fold != k, fold == k
            fit = vrpo.fit_bt(F[:, tr], data.Z[:, tr], lam=0, ridge=self.ridge, warn=False)
            w = fit.theta  # (R, p)
            g[:, te] = expit(np.einsum("rnp,rp->rn", F[:, te], w))
            if same:
                ga[:, te] = expit(np.einsum("rnmp,rp->rnm", Fa[:, te], w))
            else:
                ga += expit(np.einsum("rnp,rp->rn", Fa, w)) / self.folds
        return g, ga
