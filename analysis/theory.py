"""Population theory of docs/method.md section 3 for any scenario, auxiliary model, M and ``lam``.

For a scenario and an auxiliary model ``g`` this computes, at ``theta*``,

- ``H = E[s(1-s) X X^T]`` (the Hessian of every estimator),
- the meat of the VR sandwich as a quadratic in ``lam``: ``Sigma(lam) = S0 + lam S1 + lam^2 S2``,
  held in a :class:`vrpo.variance.VarianceParts` with ``n = 1``, so ``V(lam)``,
  ``Sigma_MLE = Sigma(0)``, ``Sigma_VR = Sigma(lam)`` and the optimal ``lam`` come
  from the *same* methods the estimator uses for its sandwich and its power tuning,
- ``G = E_x Cov_{a ~ pi_theta*(.|x)}(phi(x, a))`` and the regret constant ``tr(G V) / (2 beta)``.

Population moments (per labelled prompt; ``a = (s - Z) X``, ``u = (s - g) X`` the
residual of one extra pair, ``gbar = E[g | pair]`` over the annotator's own noise):

    S0 = E[((s - p*)^2 + Var(Z|pair)) X X^T] - E[a] E[a]^T
    same prompts:  S1 = 2 sym( -E[(s - p*)(s - gbar) X X^T] + E_x[ E[a|x] E[u|x]^T ] )
                   S2 = (1 + 1/M) E_x Cov(u | x)
    fresh prompts: S1 = 2 sym( -E[(s - p*)(s - gbar) X X^T] + E[a] E[u]^T )
                   S2 = (1 + 1/M) Cov(u)        (N = M n extra prompts)

with ``E[u u^T | pair] = ((s - gbar)^2 + Var(g | pair)) X X^T``. With ``g = p*`` these
give ``Sigma_MLE - Sigma_VR(1) = (1 - 1/M) E_x Var(m | x)`` (same prompts). Sums over
arm pairs are exact (weights ``pi_ref(a) pi_ref(b)``); the expectation over contexts
is a sample of ``n_ctx`` contexts split into ``n_batches`` batches, and every scalar
carries its delete-one-batch jackknife standard error (``theta*`` held fixed; its own
Monte Carlo error is reported separately as ``theta_star_se``).

Each auxiliary model supplies its own limit (``gbar``, ``Var(g | pair)``) through
:meth:`sim.aux_models.AuxModel.population_limit`: ``oracle``, ``biased``,
``constant`` evaluate themselves on all arm pairs; ``noisy:s`` integrates over its
Gaussian logit noise; ``self`` tends to ``sigma(theta* . X)`` (then ``S1 = S2 = 0``:
VR equals the MLE); ``learned:K`` to the population ridge-logistic fit of its
feature class (cross-fitting does not change the limit).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.special import expit

import vrpo
from sim.aux_models import make_aux
from sim.bandit import Bandit, BanditSpec, Contexts
from sim.policy import log_policy_linear
from sim.population import all_pairs
from sim.scenarios import make_scenario
from vrpo.variance import VarianceParts, margins, pair_hessian, pair_score, xtwx
from vrpo_common.fileio import atomic_path

__all__ = ["PopulationTheory", "population_theory", "policy_G", "aux_limit", "THEORY_VERSION", "theory_cached"]

THEORY_VERSION = 2
_STREAM_THEORY = 0x7E0


def _crc(s: str) -> int:
    return zlib.crc32(s.encode())


# --------------------------------------------------------------------------- G and regret


def policy_G(theta, phi, log_pi_ref, beta):
    """``G = E_x Cov_{a ~ pi_theta(.|x)}(phi(x, a))`` over contexts ``phi (E, K, d)``.

    ``pi_theta propto pi_ref exp(theta . phi / beta)``; returns ``(d, d)``. The
    regret of a nearby ``theta + dtheta`` is ``beta KL ~ dtheta^T G dtheta / (2 beta)``.
    """
    pi = np.exp(log_policy_linear(np.asarray(theta)[None], phi, log_pi_ref, beta)[0])  # (E, K)
    return _policy_G_sum(pi, phi) / phi.shape[0]


def _policy_G_sum(pi, phi):
    mean = np.einsum("ek,ekd->ed", pi, phi)  # (E, d)
    second = np.einsum("ek,ekd,ekf->df", pi, phi, phi)  # (d, d)
    return second - mean.T @ mean


# --------------------------------------------------------------------------- limiting g


def aux_limit(g_spec: str, scenario, theta_star, ctx: Contexts, P, state: dict | None = None):
    """Limiting ``(gbar, var_g)`` of auxiliary model ``g_spec`` on all arm pairs, ``(C, K, K)`` each.

    The model computes it (:meth:`sim.aux_models.AuxModel.population_limit`).
    ``state`` maps :meth:`~sim.aux_models.AuxModel.limit_key` to the result of
    :meth:`~sim.aux_models.AuxModel.fit_limit` on the theory's whole context
    sample; a model needing one that ``state`` lacks fits it on ``ctx``.
    """
    aux = make_aux(g_spec, scenario)
    key = aux.limit_key()
    if state is None or key not in state:
        fitted = aux.fit_limit(ctx)
        if state is not None:
            state[key] = fitted
    return aux.population_limit(ctx, P, theta_star, state[key] if state is not None else fitted)


# --------------------------------------------------------------------------- moments


_MOMENTS = ("H", "Eaa", "ma", "Eab", "mu_cross", "Euu", "muu", "mu", "G", "G_ref", "count")


def _batch_moments(theta, X, P, W, Vz, gbar, vg, pi_star, phi, pi_ref=None):
    """Sums over the contexts of one batch of the population moments (module docstring).

    ``X (C, K, K, d)``, ``P, W, Vz, gbar, vg (C, K, K)``, ``pi_star, pi_ref (C, K)``,
    ``phi (C, K, d)``. ``G_ref`` (``G`` under ``pi_ref``) is kept for the mutation tests.
    """
    C, K, _, d = X.shape
    Xr = X.reshape(C, K * K, d)  # (C, K^2, d)
    Wr = W.reshape(C, K * K)
    a = pair_score(theta, Xr, P.reshape(C, K * K))  # (C, K^2, d)  (s - p*) X
    u = pair_score(theta, Xr, gbar.reshape(C, K * K))  # (C, K^2, d)  (s - gbar) X
    s = expit(margins(theta, Xr))
    ra, ru = s - P.reshape(C, K * K), s - gbar.reshape(C, K * K)
    mu_a = np.einsum("cr,crd->cd", Wr, a)  # (C, d)  E[a | x]
    mu_u = np.einsum("cr,crd->cd", Wr, u)  # (C, d)  E[u | x]
    flat = lambda v: v.reshape(-1)  # noqa: E731
    Xf = Xr.reshape(C * K * K, d)
    return {
        "H": pair_hessian(theta, Xf, flat(Wr)),  # weights sum to C: a sum over contexts
        "Eaa": xtwx(Xf, flat(Wr * (ra**2 + Vz.reshape(C, K * K)))),
        "ma": mu_a.sum(axis=0),
        "Eab": xtwx(Xf, flat(Wr * ra * ru)),
        "mu_cross": mu_a.T @ mu_u,
        "Euu": xtwx(Xf, flat(Wr * (ru**2 + vg.reshape(C, K * K)))),
        "muu": mu_u.T @ mu_u,
        "mu": mu_u.sum(axis=0),
        "G": _policy_G_sum(pi_star, phi),
        "G_ref": _policy_G_sum(np.broadcast_to(1.0 / K, (C, K)) if pi_ref is None else pi_ref, phi),
        "count": float(C),
    }


def _parts_from_moments(mom: dict, M: int, aux_prompts: str, aux_factor: float | None = None, G_key: str = "G"):
    """``(VarianceParts(n=1), G)`` from (possibly stacked) moment sums.

    ``aux_factor``: the factor of the extra pairs' covariance in ``S2``; ``1 + 1/M`` (the
    labelled pair's own correction plus the mean of ``M`` extra pairs) unless a mutation
    test overrides it. ``G_key``: ``"G"`` (under ``pi_theta*``) or ``"G_ref"``.
    """
    c = np.asarray(mom["count"], dtype=float)
    cm, cv = c[..., None, None], c[..., None]
    E = {k: mom[k] / (cm if np.ndim(mom[k]) == np.ndim(c) + 2 else cv) for k in _MOMENTS if k != "count" and k in mom}
    outer = lambda u, v: u[..., :, None] * v[..., None, :]  # noqa: E731
    sym = lambda S: S + np.swapaxes(S, -1, -2)  # noqa: E731
    f = 1.0 + 1.0 / M if aux_factor is None else float(aux_factor)
    S0 = E["Eaa"] - outer(E["ma"], E["ma"])
    if aux_prompts == "same":
        S1 = sym(-E["Eab"] + E["mu_cross"])
        S2 = f * (E["Euu"] - E["muu"])
    elif aux_prompts == "fresh":
        S1 = sym(-E["Eab"] + outer(E["ma"], E["mu"]))
        S2 = f * (E["Euu"] - outer(E["mu"], E["mu"]))
    else:
        raise ValueError(f"aux_prompts must be 'same' or 'fresh', got {aux_prompts!r}")
    A = np.linalg.inv(E["H"])
    return VarianceParts(A=A, S0=S0, S1=S1, S2=S2, n=1), E[G_key]


# --------------------------------------------------------------------------- result


@dataclass
class PopulationTheory:
    """Asymptotic theory of one scenario x ``g`` x ``M`` x prompts (module docstring).

    ``parts``: :class:`VarianceParts` (``n = 1``) of the full context sample; ``jack``:
    the same with a leading axis of ``n_batches`` delete-one-batch estimates; ``G``
    and ``G_jack`` likewise.
    """

    scenario: str
    g: str
    M: int
    aux_prompts: str
    beta: float
    theta_star: np.ndarray
    theta_star_se: np.ndarray
    parts: VarianceParts
    G: np.ndarray
    jack: VarianceParts
    G_jack: np.ndarray
    n_ctx: int
    n_batches: int
    moments: dict | None = None  # moment sums over the context sample (for variants)
    moments_jack: dict | None = None  # delete-one-batch sums, leading axis n_batches

    # -- variants (mutation tests, the other prompt design)
    def variant(self, *, aux_prompts: str | None = None, M: int | None = None, aux_factor: float | None = None,
                G: str = "G", label: str | None = None) -> "PopulationTheory":
        """The theory of another design, or a deliberately wrong one, from the same moments.

        ``aux_prompts``/``M``: another prompt design or number of extra pairs;
        ``aux_factor``: override the ``1 + 1/M`` factor of ``S2``; ``G``: ``"G"`` or
        ``"G_ref"`` (``G`` under ``pi_ref``). Needs :attr:`moments` (computed since
        ``THEORY_VERSION = 2``).
        """
        if self.moments is None or self.moments_jack is None:
            raise ValueError("this PopulationTheory carries no moments (cached before THEORY_VERSION 2); recompute it")
        ap = self.aux_prompts if aux_prompts is None else aux_prompts
        M = self.M if M is None else int(M)
        parts, G_ = _parts_from_moments(self.moments, M, ap, aux_factor, G)
        jack, G_jack = _parts_from_moments(self.moments_jack, M, ap, aux_factor, G)
        return dataclasses.replace(self, aux_prompts=ap, M=M, parts=parts, G=G_, jack=jack, G_jack=G_jack,
                                   g=self.g if label is None else label)

    # -- named quantities
    @property
    def H(self):
        return np.linalg.inv(self.parts.A)

    def lam(self, method) -> float:
        """``lam`` of a method (``mle``/``vr``/``vr-auto``/``vr:<lam>``/a number); ``vr-auto``
        is the optimal ``lam`` clipped to [0, 1], as the estimator clips it."""
        from sim.config import parse_method

        lam = parse_method(method) if isinstance(method, str) else float(method)
        return float(self.parts.lam_opt()) if lam == "auto" else float(lam)

    def lam_opt(self, clip=(0.0, 1.0)) -> float:
        return float(self.parts.lam_opt(clip=clip))

    def Sigma(self, lam):
        return self.parts.sigma(lam)

    def V(self, lam):
        return self.parts.V(lam)

    def trV(self, lam) -> float:
        return float(np.trace(self.parts.V(lam)))

    def regret_const(self, lam, G=None) -> float:
        """``n E[regret] -> tr(G V(lam)) / (2 beta)``."""
        G = self.G if G is None else G
        return float(np.trace(G @ self.parts.V(lam)) / (2.0 * self.beta))

    # -- Monte Carlo error of the context sample
    def jackknife_se(self, fn) -> float:
        """Delete-one-batch jackknife SE of ``fn(parts, G) -> (...)`` scalar(s)."""
        vals = np.asarray(fn(self.jack, self.G_jack), dtype=float)  # (B,)
        B = vals.shape[0]
        return float(np.sqrt((B - 1) / B * np.sum((vals - vals.mean()) ** 2)))

    def _lam_b(self, method):
        if method == "vr-auto":
            return lambda P: P.lam_opt()
        lam = self.lam(method)
        return lambda P: np.full(P.A.shape[:-2], lam)

    def trV_se(self, method) -> float:
        lb = self._lam_b(method)
        return self.jackknife_se(lambda P, G: np.trace(P.V(lb(P)), axis1=-2, axis2=-1))

    def regret_const_se(self, method) -> float:
        lb = self._lam_b(method)
        return self.jackknife_se(lambda P, G: np.trace(G @ P.V(lb(P)), axis1=-2, axis2=-1) / (2 * self.beta))

    def ratio_se(self, method, what="trV") -> float:
        lb = self._lam_b(method)

        def f(P, G):
            W = np.broadcast_to(np.eye(G.shape[-1]), G.shape) if what == "trV" else G
            num = np.trace(W @ P.V(lb(P)), axis1=-2, axis2=-1)
            den = np.trace(W @ P.V(np.zeros(P.A.shape[:-2])), axis1=-2, axis2=-1)
            return num / den

        return self.jackknife_se(f)

    def row(self, method) -> dict:
        """One table row: ``lam``, ``trV``, ``regret_const``, ratios to the MLE, each with its SE."""
        lam = self.lam(method)
        trV0, rc0 = self.trV(0.0), self.regret_const(0.0)
        return {
            "scenario": self.scenario, "g": self.g if method != "mle" else "none", "method": method, "M": self.M,
            "aux_prompts": self.aux_prompts, "lam": lam,
            "trV": self.trV(lam), "trV_se": self.trV_se(method),
            "regret_const": self.regret_const(lam), "regret_const_se": self.regret_const_se(method),
            "var_ratio": self.trV(lam) / trV0, "var_ratio_se": self.ratio_se(method, "trV"),
            "regret_ratio": self.regret_const(lam) / rc0, "regret_ratio_se": self.ratio_se(method, "G"),
            "lam_opt_unclipped": self.lam_opt(clip=None),
        }

    # -- (de)serialisation for the cache
    def to_dict(self) -> dict:
        def pd_(P):
            return {k: np.asarray(getattr(P, k)).tolist() for k in ("A", "S0", "S1", "S2")}

        def md(m):
            return None if m is None else {k: np.asarray(v).tolist() for k, v in m.items()}

        return {"scenario": self.scenario, "g": self.g, "M": self.M, "aux_prompts": self.aux_prompts,
                "beta": self.beta, "theta_star": self.theta_star.tolist(), "theta_star_se": self.theta_star_se.tolist(),
                "parts": pd_(self.parts), "G": self.G.tolist(), "jack": pd_(self.jack), "G_jack": self.G_jack.tolist(),
                "n_ctx": self.n_ctx, "n_batches": self.n_batches, "moments": md(self.moments),
                "moments_jack": md(self.moments_jack)}

    @classmethod
    def from_dict(cls, d: dict) -> "PopulationTheory":
        def vp(x):
            return VarianceParts(**{k: np.asarray(x[k]) for k in ("A", "S0", "S1", "S2")}, n=1)

        def md(m):
            return None if m is None else {k: np.asarray(v) for k, v in m.items()}

        return cls(scenario=d["scenario"], g=d["g"], M=int(d["M"]), aux_prompts=d["aux_prompts"], beta=d["beta"],
                   theta_star=np.asarray(d["theta_star"]), theta_star_se=np.asarray(d["theta_star_se"]),
                   parts=vp(d["parts"]), G=np.asarray(d["G"]), jack=vp(d["jack"]), G_jack=np.asarray(d["G_jack"]),
                   n_ctx=int(d["n_ctx"]), n_batches=int(d["n_batches"]), moments=md(d.get("moments")),
                   moments_jack=md(d.get("moments_jack")))


# --------------------------------------------------------------------------- driver


def theory_contexts(spec: BanditSpec, scenario: str, n_ctx: int) -> Contexts:
    """The theory's own context sample (seeded by ``spec.seed`` and the scenario name)."""
    bandit = Bandit(spec)
    rng = np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(_crc(scenario), _STREAM_THEORY)))
    return bandit.sample_contexts(rng, n_ctx)


def population_theory(spec: BanditSpec, scenario: str, g: str | list[str], M: int = 4, aux_prompts: str = "same",
                      n_ctx: int = 20000, n_batches: int = 20, theta_star=None):
    """:class:`PopulationTheory` of ``scenario`` for each auxiliary model in ``g``.

    ``spec``: the bandit (``d, K, dx, scale, beta, pi_ref, seed``); ``theta_star``:
    optional precomputed ``(theta*, se)`` on the same contexts. A list ``g`` shares
    ``theta*`` and the context sample; returns a list then, else one object.
    """
    gs = [g] if isinstance(g, str) else list(g)
    if n_ctx % n_batches:
        raise ValueError(f"n_ctx ({n_ctx}) must be a multiple of n_batches ({n_batches})")
    bandit = Bandit(spec)
    scen = make_scenario(scenario, bandit)
    ctx = theory_contexts(spec, scenario, n_ctx)
    if theta_star is None:
        from sim.population import theta_star as _theta_star

        theta_star = _theta_star(scen, ctx)
    th, th_se = theta_star
    state = {}  # limit_key -> fit_limit on the whole context sample
    for gs_ in gs:
        aux = make_aux(gs_, scen)
        if aux.limit_key() not in state:
            state[aux.limit_key()] = aux.fit_limit(ctx)
    bs = n_ctx // n_batches
    per_g = {gs_: [] for gs_ in gs}
    for b in range(n_batches):
        sl = slice(b * bs, (b + 1) * bs)
        cb = Contexts(ctx.x[sl], ctx.phi[sl], ctx.log_pi_ref[sl])
        X, P, W, Vz = all_pairs(scen, cb)
        pi_star = np.exp(log_policy_linear(th[None], cb.phi, cb.log_pi_ref, spec.beta)[0])
        for gs_ in gs:
            gbar, vg = aux_limit(gs_, scen, th, cb, P, state)
            per_g[gs_].append(_batch_moments(th, X, P, W, Vz, gbar, vg, pi_star, cb.phi, cb.pi_ref))
    out = []
    for gs_ in gs:
        mom = {k: np.stack([m[k] for m in per_g[gs_]]) for k in _MOMENTS}  # (B, ...)
        total = {k: v.sum(axis=0) for k, v in mom.items()}
        loo = {k: total[k][None] - v for k, v in mom.items()}
        parts, G = _parts_from_moments(total, M, aux_prompts)
        jack, G_jack = _parts_from_moments(loo, M, aux_prompts)
        out.append(PopulationTheory(scenario=scenario, g=gs_, M=M, aux_prompts=aux_prompts, beta=spec.beta,
                                    theta_star=np.asarray(th), theta_star_se=np.asarray(th_se), parts=parts, G=G,
                                    jack=jack, G_jack=G_jack, n_ctx=n_ctx, n_batches=n_batches, moments=total,
                                    moments_jack=loo))
    return out[0] if isinstance(g, str) else out


def _theory_key(spec: BanditSpec, scenario, g, M, aux_prompts, n_ctx, n_batches, theta_star=None) -> str:
    ident = {"spec": asdict(spec), "scenario": scenario, "g": g, "M": M, "aux_prompts": aux_prompts, "n_ctx": n_ctx,
             "n_batches": n_batches, "theory_version": THEORY_VERSION, "vrpo_version": vrpo.__version__,
             "theta_star": None if theta_star is None else [round(float(v), 12) for v in theta_star[0]]}
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def theory_cached(spec: BanditSpec, scenario: str, gs, M: int = 4, aux_prompts: str = "same", n_ctx: int = 20000,
                  n_batches: int = 20, cache_dir=None, theta_star=None) -> dict:
    """``{g: PopulationTheory}``, read from / written to ``cache_dir`` (JSON, atomic) when given.

    ``theta_star``: optional ``(theta*, se)`` at which to evaluate (default: fitted on
    the theory's own contexts)."""
    gs = list(dict.fromkeys(gs))
    out, missing = {}, []
    cache_dir = None if cache_dir is None else Path(cache_dir)
    for g in gs:
        f = None if cache_dir is None else cache_dir / f"{_theory_key(spec, scenario, g, M, aux_prompts, n_ctx, n_batches, theta_star)}.json"
        if f is not None and f.exists():
            out[g] = PopulationTheory.from_dict(json.loads(f.read_text()))
        else:
            missing.append(g)
    if missing:
        res = population_theory(spec, scenario, missing, M, aux_prompts, n_ctx, n_batches, theta_star=theta_star)
        for g, t in zip(missing, res):
            out[g] = t
            if cache_dir is not None:
                f = cache_dir / f"{_theory_key(spec, scenario, g, M, aux_prompts, n_ctx, n_batches, theta_star)}.json"
                with atomic_path(f) as tmp, open(tmp, "w") as fh:
                    json.dump(t.to_dict(), fh)
    return {g: out[g] for g in gs}
