"""The misspecification zoo (docs/method.md section 5).

Every scenario maps a pair ``(x, y1, y2)`` (through ``x (..., dx)`` and the arm
features ``phi1, phi2 (..., d)``, broadcasting) to ``p*(x, y1, y2) = P(y1
preferred)``. Strength ``kappa = 0`` is exactly BT with utility
``u = theta_0 . phi``. ``p*(a, b) = 1 - p*(b, a)`` holds for all but the
deliberate ``position`` scenario (``symmetric = False``).

Add one by subclassing :class:`Scenario` and registering it::

    @register_scenario("shifted")
    class Shifted(Scenario):
        def p_star(self, x, phi1, phi2):
            return sigmoid(self.du(phi1, phi2) + 0.3 * self.kappa)
"""

from __future__ import annotations

import numpy as np
from scipy.stats import cauchy, norm

from vrpo.loss import sigmoid  # the one sigmoid (re-exported for scenario plugins)

from .bandit import Bandit
from .registry import SCENARIOS, register_scenario

__all__ = ["Scenario", "make_scenario", "SCENARIOS", "sigmoid"]


class Scenario:
    """Base class: Bradley-Terry with utility ``theta_0 . phi``.

    Subclasses override :meth:`p_star` (and, where they have one, :meth:`utility`;
    for non-Bernoulli labels :meth:`sample_labels` and :meth:`label_var`).
    :meth:`setup` draws the scenario's own structural parameters.
    """

    name = "bt"
    default_kappa = 0.0
    kappa_range = (0.0, np.inf)  # closed-open allowed interval for kappa
    symmetric = True  # p*(a,b) = 1 - p*(b,a)
    has_utility = True

    def __init__(self, kappa: float | None, bandit: Bandit):
        kappa = self.default_kappa if kappa is None else float(kappa)
        lo, hi = self.kappa_range
        if not (np.isfinite(kappa) and lo <= kappa <= hi):
            raise ValueError(f"scenario {self.name!r}: kappa must lie in [{lo}, {hi}], got {kappa!r}")
        self.kappa = kappa
        self.bandit = bandit
        self.theta_0 = bandit.theta_0
        self.setup(bandit.structural_rng(f"scenario/{self.name}"))

    def setup(self, rng: np.random.Generator) -> None:
        """Draw structural parameters (called once, deterministic per bandit seed)."""

    # -- building blocks
    def du(self, phi1, phi2):
        """BT utility difference ``theta_0 . (phi1 - phi2)``."""
        return (phi1 - phi2) @ self.theta_0

    def utility(self, x, phi):
        """True utility ``u(x, y)`` (``None`` where the scenario has none)."""
        return phi @ self.theta_0

    # -- the preference model
    def p_star(self, x, phi1, phi2):
        return sigmoid(self.du(phi1, phi2))

    def sample_labels(self, rng: np.random.Generator, x, phi1, phi2, p):
        """Labels ``Z`` with ``E[Z | pair] = p``; Bernoulli by default."""
        return (rng.random(np.shape(p)) < p).astype(float)

    def label_var(self, x, phi1, phi2, p):
        """``Var(Z | pair)``; ``p(1-p)`` for Bernoulli labels."""
        return p * (1.0 - p)

    def __repr__(self):
        return f"{type(self).__name__}(kappa={self.kappa})"


def make_scenario(spec: str, bandit: Bandit) -> Scenario:
    """Build a scenario from ``"name"`` or ``"name:kappa"``."""
    name, arg = SCENARIOS.parse(spec)
    cls = SCENARIOS.get(name)
    try:
        kappa = None if arg is None else float(arg)
    except ValueError:
        raise ValueError(f"scenario spec {spec!r}: kappa must be a number") from None
    return cls(kappa, bandit)


@register_scenario("bt")
class BT(Scenario):
    """Well specified: ``p* = sigma(du)``; ``kappa`` is ignored. VR must not help."""


class _LinkBlend(Scenario):
    """``(1 - kappa) sigma(du) + kappa F(du)`` for an antisymmetric link CDF ``F`` (``link``)."""

    default_kappa = 1.0
    kappa_range = (0.0, 1.0)

    def link(self, du):
        raise NotImplementedError

    def p_star(self, x, phi1, phi2):
        du = self.du(phi1, phi2)
        return (1 - self.kappa) * sigmoid(du) + self.kappa * self.link(du)


@register_scenario("probit")
class Probit(_LinkBlend):
    """Thurstone annotators: ``(1-kappa) sigma(du) + kappa Phi(du / c)``, ``c = 1``."""

    c = 1.0

    def link(self, du):
        return norm.cdf(du / self.c)


@register_scenario("heavy-tail")
class HeavyTail(_LinkBlend):
    """Occasional wild judgements: ``(1-kappa) sigma(du) + kappa F_Cauchy(du)``."""

    def link(self, du):
        return cauchy.cdf(du)


def _two_types(theta_0, kappa, rng):
    """Annotator types ``theta_0 +- kappa |theta_0| v``, ``v`` a random unit vector orthogonal to
    ``theta_0`` (any unit vector when ``d = 1``); returns ``(2, d)``."""
    v = rng.standard_normal(theta_0.shape)
    t = theta_0 / np.linalg.norm(theta_0)
    v = v - (v @ t) * t if v.size > 1 else v
    v = v / np.linalg.norm(v)
    r = kappa * np.linalg.norm(theta_0)
    return np.stack([theta_0 + r * v, theta_0 - r * v])


@register_scenario("mixture")
class Mixture(Scenario):
    """Two annotator types ``theta_k = theta_0 +- kappa |theta_0| v`` (``v`` a unit vector
    orthogonal to ``theta_0``), weights 1/2: ``p* = sum_k w_k sigma(theta_k . (phi1 - phi2))``.
    The utility is the mean type ``theta_0`` (the average annotator's welfare)."""

    name = "mixture"
    default_kappa = 1.0

    def setup(self, rng):
        self.types = _two_types(self.theta_0, self.kappa, rng)  # (2, d)
        self.weights = np.array([0.5, 0.5])

    def p_star(self, x, phi1, phi2):
        X = phi1 - phi2
        return sum(w * sigmoid(X @ th) for w, th in zip(self.weights, self.types))


class _ContextMixture(Scenario):
    """Two annotator types (as in ``mixture``) whose mixture weight depends on the prompt:
    ``p* = w(x) sigma(theta_1 . X) + (1 - w(x)) sigma(theta_2 . X)``, ``X = phi1 - phi2``,
    ``w(x) = W(gamma . x)`` with ``gamma`` a fixed unit vector in context space.

    Because the type is (mostly) set by the prompt, the misspecification residual
    ``m = (s - p*) X`` has a large *between-prompt* part ``Var_x E[m | x]`` besides the
    within-prompt part: the family that separates shared from fresh extra prompts, a
    clustered from an unclustered sandwich and the clustered from the naive PPI++ ``lam``
    (docs/method.md s3). ``kappa = 0`` is BT; ``p*(a, b) = 1 - p*(b, a)``.
    """

    default_kappa = 1.0

    def setup(self, rng):
        self.types = _two_types(self.theta_0, self.kappa, rng)  # (2, d)
        g = self.bandit.structural_rng(f"scenario/{self.name}/gamma").standard_normal(self.bandit.spec.dx)
        self.gamma = g / np.linalg.norm(g)  # (dx,)

    def weight(self, x):
        """``w(x) = P(type 1 | x)``, broadcasting over ``x (..., dx)`` -> ``(...)``."""
        raise NotImplementedError

    def p_star(self, x, phi1, phi2):
        X = phi1 - phi2
        w = self.weight(x)
        return w * sigmoid(X @ self.types[0]) + (1.0 - w) * sigmoid(X @ self.types[1])


@register_scenario("prompt-type")
class PromptType(_ContextMixture):
    """The annotator type is set by the prompt: type 1 judges the prompts with ``gamma . x > 0``,
    type 2 the others (``w(x) = 1{gamma . x > 0}``)."""

    def weight(self, x):
        return (np.asarray(x) @ self.gamma > 0).astype(float)


@register_scenario("context-mixture")
class ContextMixture(_ContextMixture):
    """The mixture weight depends smoothly on the context: ``w(x) = sigma(2 gamma . x)``."""

    slope = 2.0

    def weight(self, x):
        return sigmoid(self.slope * (np.asarray(x) @ self.gamma))


@register_scenario("flip")
class Flip(Scenario):
    """Label noise: ``eps + (1 - 2 eps) sigma(du)`` with ``eps = kappa`` in [0, 0.5)."""

    name = "flip"
    default_kappa = 0.2
    kappa_range = (0.0, 0.4999)

    def p_star(self, x, phi1, phi2):
        return self.kappa + (1 - 2 * self.kappa) * sigmoid(self.du(phi1, phi2))


@register_scenario("hetero")
class Hetero(Scenario):
    """Prompt-dependent confidence: ``sigma(du / tau(x))``, ``tau(x) = exp(kappa gamma . x)``,
    ``gamma`` a fixed unit vector."""

    name = "hetero"
    default_kappa = 1.0

    def setup(self, rng):
        g = rng.standard_normal(self.bandit.spec.dx)
        self.gamma = g / np.linalg.norm(g)

    def p_star(self, x, phi1, phi2):
        tau = np.exp(self.kappa * (x @ self.gamma))
        return sigmoid(self.du(phi1, phi2) / tau)


@register_scenario("intransitive")
class Intransitive(Scenario):
    """Cyclic preferences: ``sigma(du + kappa phi1^T A phi2)``, ``A`` skew-symmetric with
    ``|A|_F = sqrt(2) |theta_0|`` (so at kappa = 1 the cyclic part is as large as ``du``).
    No utility exists."""

    name = "intransitive"
    default_kappa = 1.0
    has_utility = False

    def setup(self, rng):
        d = self.theta_0.shape[0]
        B = rng.standard_normal((d, d))
        A = B - B.T
        nrm = np.linalg.norm(A)
        self.A = A * (np.sqrt(2) * np.linalg.norm(self.theta_0) / nrm) if nrm > 0 else A

    def utility(self, x, phi):
        return None

    def p_star(self, x, phi1, phi2):
        cyc = np.einsum("...i,ij,...j->...", phi1, self.A, phi2)
        return sigmoid(self.du(phi1, phi2) + self.kappa * cyc)


@register_scenario("nonlinear")
class Nonlinear(Scenario):
    """Reward class too small: ``u_nl = theta_0 . phi + kappa (phi^T B phi - tr B)``, ``B``
    symmetric with ``|B|_F = |theta_0| / sqrt(2)`` (quadratic part with the spread of the
    linear one); ``p* = sigma(u_nl(y1) - u_nl(y2))``."""

    name = "nonlinear"
    default_kappa = 1.0

    def setup(self, rng):
        d = self.theta_0.shape[0]
        C = rng.standard_normal((d, d))
        B = (C + C.T) / 2
        self.B = B * (np.linalg.norm(self.theta_0) / np.sqrt(2) / np.linalg.norm(B))

    def utility(self, x, phi):
        quad = np.einsum("...i,ij,...j->...", phi, self.B, phi) - np.trace(self.B)
        return phi @ self.theta_0 + self.kappa * quad

    def p_star(self, x, phi1, phi2):
        return sigmoid(self.utility(x, phi1) - self.utility(x, phi2))


@register_scenario("position")
class Position(Scenario):
    """Presentation bias towards the first-shown response: ``sigma(du + kappa)``. The order
    of presentation is random (pairs are drawn i.i.d.), so ``p*(a,b) != 1 - p*(b,a)``."""

    name = "position"
    default_kappa = 1.0
    kappa_range = (-np.inf, np.inf)
    symmetric = False

    def p_star(self, x, phi1, phi2):
        return sigmoid(self.du(phi1, phi2) + self.kappa)


@register_scenario("ties")
class Ties(Scenario):
    """Davidson ties with ``nu = kappa``: ``P(win) = 1 / (1 + e^-du + nu e^-du/2)``,
    ``P(tie) = nu / (2 cosh(du/2) + nu)``; a tie is recorded as ``Z = 1/2`` so
    ``p* = P(win) + P(tie)/2``."""

    name = "ties"
    default_kappa = 1.0

    def _probs(self, phi1, phi2):
        du = self.du(phi1, phi2)
        with np.errstate(over="ignore"):
            p_win = 1.0 / (1.0 + np.exp(-du) + self.kappa * np.exp(-du / 2))
            p_tie = self.kappa / (2.0 * np.cosh(du / 2) + self.kappa)
        return p_win, p_tie

    def p_star(self, x, phi1, phi2):
        p_win, p_tie = self._probs(phi1, phi2)
        return p_win + 0.5 * p_tie

    def sample_labels(self, rng, x, phi1, phi2, p):
        p_win, p_tie = self._probs(phi1, phi2)
        u = rng.random(np.shape(p))
        return np.where(u < p_win, 1.0, np.where(u < p_win + p_tie, 0.5, 0.0))

    def label_var(self, x, phi1, phi2, p):
        p_win, p_tie = self._probs(phi1, phi2)
        return p_win + 0.25 * p_tie - p**2
