"""The auxiliary-model zoo ``g`` (docs/method.md section 6).

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
            return 0.5 + 0.5 * (data.p_star - 0.5), 0.5 + 0.5 * (data.p_star_aux - 0.5)

        def population_limit(self, ctx, P, theta_star, fitted=None):  # for analysis.theory
            return 0.5 + 0.5 * (P - 0.5), np.zeros(P.shape)

(or set ``deterministic = True`` when ``g`` is a fixed function of the pair: the limit is
then the model evaluated on every arm pair).
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, logit

import vrpo

from vrpo.crossfit import cross_fit_logistic
from vrpo.variance import margins

from .bandit import Contexts
from .data import PairData
from .population import all_pairs, all_pairs_data
from .registry import AUX_MODELS, register_aux
from .scenarios import Scenario

__all__ = ["AuxModel", "make_aux", "AUX_MODELS", "quadratic_pair_features"]

_EPS = 1e-12  # p* is clipped to [_EPS, 1 - _EPS] before its logit (noisy annotator)


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
        if g.shape != data.Z.shape or g_aux.shape != data.p_star_aux.shape:
            raise ValueError(f"auxiliary model {self.name!r} returned shapes {g.shape}, {g_aux.shape}; "
                             f"expected {data.Z.shape}, {data.p_star_aux.shape}")
        for nm, v in (("g", g), ("g_aux", g_aux)):
            if not np.all(np.isfinite(v)) or v.min() < 0 or v.max() > 1:
                raise ValueError(f"auxiliary model {self.name!r} produced {nm} outside [0, 1] or non-finite")
        return g, g_aux

    # -- population limit (analysis.theory): E[g | pair] and Var(g | pair) on all arm pairs
    deterministic = False  # True: g is a fixed function of the pair (no annotator noise)

    def limit_key(self):
        """Hashable identity of :meth:`fit_limit`'s result, so models sharing it fit it once."""
        return (self.name, self.arg)

    def fit_limit(self, ctx: Contexts):
        """What :meth:`population_limit` needs from the theory's whole context sample
        (fitted once per theory run); default: nothing."""
        return None

    def population_limit(self, ctx: Contexts, P, theta_star, fitted=None):
        """Limiting ``(gbar, var_g)`` on every ordered arm pair of ``ctx``, ``(C, K, K)`` each.

        ``gbar = E[g | pair]``, ``var_g = Var(g | pair)`` over the annotator's own noise;
        ``P (C, K, K)`` is ``p*`` on those pairs, ``theta_star (d,)`` the BT projection,
        ``fitted`` the result of :meth:`fit_limit`. The default evaluates a
        :attr:`deterministic` model itself; other models must override it.
        """
        if not self.deterministic:
            raise NotImplementedError(f"auxiliary model {self.name!r} has no population limit; "
                                      "define population_limit (or set deterministic = True)")
        g, _ = self(all_pairs_data(ctx, P), [np.random.default_rng(0)])
        return g.reshape(P.shape), np.zeros(P.shape)

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

    deterministic = True

    def predict(self, data, rngs):
        return data.p_star, data.p_star_aux


@register_aux("noisy")
class Noisy(AuxModel):
    """An imperfect LLM annotator: ``g = sigma(logit p* + s eps)``, ``eps ~ N(0,1)`` per pair."""

    default_arg = "1.0"

    def setup(self):
        self.s = self._float_arg(lo=0.0)

    def predict(self, data, rngs):
        out = []
        for r, rng in enumerate(rngs):
            lp = logit(np.clip(data.p_star[r], _EPS, 1 - _EPS))
            lpa = logit(np.clip(data.p_star_aux[r], _EPS, 1 - _EPS))
            out.append((expit(lp + self.s * rng.standard_normal(lp.shape)),
                        expit(lpa + self.s * rng.standard_normal(lpa.shape))))
        return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])

    gh_nodes = 40  # Gauss-Hermite nodes for the limit's integral over the logit noise

    def population_limit(self, ctx, P, theta_star, fitted=None):
        """Integrated over ``eps`` by probabilists' Gauss-Hermite quadrature (:attr:`gh_nodes`)."""
        z, w = np.polynomial.hermite_e.hermegauss(self.gh_nodes)
        w = w / w.sum()  # E f(eps), eps ~ N(0, 1)
        lp = logit(np.clip(P, _EPS, 1 - _EPS))[..., None]
        gz = expit(lp + self.s * z)  # (C, K, K, nodes)
        m1 = gz @ w
        m2 = (gz * gz) @ w
        return m1, np.maximum(m2 - m1 * m1, 0.0)


@register_aux("biased")
class Biased(AuxModel):
    """A wrong BT model: ``sigma(theta_b . (phi1 - phi2))`` with ``theta_b`` = ``theta_0``
    rotated by ``angle`` degrees (argument, default 60) in a fixed random plane."""

    default_arg = "60"
    deterministic = True

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

    deterministic = True

    default_arg = "0.5"

    def setup(self):
        self.c = self._float_arg(lo=0.0)
        if self.c > 1:
            raise ValueError(f"constant g must lie in [0, 1], got {self.c}")

    def predict(self, data, rngs):
        return np.full(data.Z.shape, self.c), np.full(data.p_star_aux.shape, self.c)


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

    def population_limit(self, ctx, P, theta_star, fitted=None):
        """The pilot fit tends to ``theta*``: ``g = sigma(theta* . X)`` (then VR equals the MLE)."""
        X = ctx.phi[:, :, None, :] - ctx.phi[:, None, :, :]  # (C, K, K, d)
        return expit(margins(theta_star, X)), np.zeros(P.shape)


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
        Fa = quadratic_pair_features(data.x_aux, data.phi1_aux, data.phi2_aux)  # (R, n, M, p) or (R, N, p)
        return cross_fit_logistic(F, data.Z, Fa, self.folds, ridge=self.ridge)

    # Cross-fitting does not change the limit: every fold model tends to the
    # population ridge-logistic fit of the feature class.
    limit_ctx = 3000  # contexts of the theory's sample used to fit the limiting weights

    def limit_key(self):
        return ("learned", self.ridge)  # the limit does not depend on K

    def fit_limit(self, ctx: Contexts):
        sub = Contexts(ctx.x[: self.limit_ctx], ctx.phi[: self.limit_ctx], ctx.log_pi_ref[: self.limit_ctx])
        _, P, W, _ = all_pairs(self.scenario, sub)
        C, K = P.shape[:2]
        F = _all_pair_features(sub)  # (C, K, K, p)
        return vrpo.fit_bt_population(F.reshape(C * K * K, -1), P.reshape(-1), W.reshape(-1), ridge=self.ridge)

    def population_limit(self, ctx, P, theta_star, fitted=None):
        if fitted is None:
            raise ValueError("the 'learned' limit needs fitted = fit_limit(contexts): the limiting weights")
        return expit(_all_pair_features(ctx) @ fitted), np.zeros(P.shape)


def _all_pair_features(ctx: Contexts):
    """:func:`quadratic_pair_features` of every ordered arm pair, ``(C, K, K, p)``."""
    return quadratic_pair_features(ctx.x[:, None, None, :], ctx.phi[:, :, None, :], ctx.phi[:, None, :, :])
