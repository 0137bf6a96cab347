"""Population quantities of a scenario: ``theta*`` and a fixed evaluation set.

``theta*`` minimises ``E[l(delta_theta, p*)]`` (the KL projection of ``p*`` on
the BT family, docs/method.md s2). Over the arms the expectation is an exact sum
(all ``K^2`` ordered pairs weighted by ``pi_ref(a|x) pi_ref(b|x)``); over
contexts it is a sample of ``n_ctx`` contexts, whose error is reported as the
standard error ``theta_star_se`` (sandwich, contexts as clusters).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import vrpo
from vrpo.variance import pair_hessian, pair_score, wcov

from .bandit import Bandit, Contexts
from .data import PairData
from .policy import log_policy, log_policy_linear
from .scenarios import Scenario


def all_pairs(scenario: Scenario, ctx: Contexts):
    """Every ordered arm pair of every context.

    Returns ``X (C, K, K, d)`` (``phi_a - phi_b``), ``P (C, K, K)`` (``p*``),
    ``W (C, K, K)`` (``pi_ref(a) pi_ref(b)``), ``V (C, K, K)`` (label variance).
    """
    phi1 = ctx.phi[:, :, None, :]  # (C, K, 1, d)
    phi2 = ctx.phi[:, None, :, :]  # (C, 1, K, d)
    x = ctx.x[:, None, None, :]
    P = scenario.p_star(x, phi1, phi2)  # (C, K, K)
    pi = ctx.pi_ref
    W = pi[:, :, None] * pi[:, None, :]
    X = phi1 - phi2
    return X, P, W, scenario.label_var(x, phi1, phi2, P)


def all_pairs_data(ctx: Contexts, P) -> PairData:
    """All ``K^2`` ordered arm pairs of every context as a one-replication :class:`PairData`
    (``p*`` = ``P (C, K, K)``, labels ``Z = p*``, each pair its own extra pair)."""
    C, K, d = ctx.phi.shape
    phi1 = np.broadcast_to(ctx.phi[:, :, None, :], (C, K, K, d)).reshape(1, C * K * K, d)
    phi2 = np.broadcast_to(ctx.phi[:, None, :, :], (C, K, K, d)).reshape(1, C * K * K, d)
    x = np.broadcast_to(ctx.x[:, None, None, :], (C, K, K, ctx.x.shape[-1])).reshape(1, C * K * K, -1)
    p = P.reshape(1, C * K * K)
    return PairData(x=x, phi1=phi1, phi2=phi2, p_star=p, Z=p.copy(), x_aux=x[:, :, None, :], phi1_aux=phi1[:, :, None, :],
                    phi2_aux=phi2[:, :, None, :], p_star_aux=p[:, :, None], aux_prompts="same")


@dataclass
class Population:
    """``theta_star (d,)``, its Monte Carlo ``theta_star_se (d,)``, and the evaluation set.

    Evaluation set (fixed for a scenario): contexts ``ctx``, ``P (E, K, K)`` true
    preferences, ``log_pi_star (E, K)`` the policy of ``theta*``, ``log_pi_u`` the
    policy of the true utility (``None`` where the scenario has no utility).
    """

    theta_star: np.ndarray
    theta_star_se: np.ndarray
    n_ctx: int
    ctx: Contexts
    P: np.ndarray
    log_pi_star: np.ndarray
    log_pi_u: np.ndarray | None
    beta: float
    P_ref: np.ndarray | None = None  # (E, K): sum_b p*(x_e, a, b) pi_ref(b|x_e), for win rates vs pi_ref


def folded_pairs(X, P, W):
    """Unordered arm pairs ``a < b`` carrying both orders: ``(X_ab, q_ab, w_ab)``.

    The logistic loss is linear in its label and ``l(-delta, 1 - q) = l(delta, q)``, so
    the ordered pairs ``(a, b)`` and ``(b, a)`` together contribute
    ``(W_ab + W_ba) l(delta_ab, q_ab)`` with ``q_ab = (W_ab p*_ab + W_ba (1 - p*_ba)) /
    (W_ab + W_ba)`` (exact for every scenario, position bias included), and ``a = b``
    contributes a constant. Same objective, scores and Hessian on ``K (K - 1) / 2``
    instead of ``K^2`` pairs per context. Shapes ``(C, K, K, ...)`` -> ``(C, K(K-1)/2, ...)``.
    """
    K = P.shape[1]
    ia, ib = np.triu_indices(K, k=1)
    w_ab, w_ba = W[:, ia, ib], W[:, ib, ia]
    w = w_ab + w_ba
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(w > 0, (w_ab * P[:, ia, ib] + w_ba * (1.0 - P[:, ib, ia])) / np.where(w > 0, w, 1.0), 0.5)
    return X[:, ia, ib], q, w


def theta_star(scenario: Scenario, ctx: Contexts):
    """``(theta*, se)`` from the contexts ``ctx`` (exact over arms)."""
    X, P, W, _ = all_pairs(scenario, ctx)
    C, K, _, d = X.shape
    Xf, q, wf = folded_pairs(X, P, W)  # (C, L, d), (C, L), (C, L)
    L = Xf.shape[1]
    Xr = Xf.reshape(C * L, d)
    w = (wf / C).reshape(-1)
    # warm start: the fit on the first tenth of the contexts is within its sampling error
    # of theta*, so the full fit needs about half the Newton steps (same minimiser)
    th0 = None
    if C >= 2000:
        c = C // 10
        th0 = vrpo.fit_bt_population(Xr[: c * L], q[:c].reshape(-1), w[: c * L], tol=1e-6)
    th = vrpo.fit_bt_population(Xr, q.reshape(-1), w, theta0=th0)
    # clustered sandwich over contexts: psi_c = sum_ab W_ab (s - p*) X_ab = sum_{a<b} w_ab (s - q_ab) X_ab
    psi = np.einsum("cl,cld->cd", wf, pair_score(th, Xf, q))
    A = np.linalg.inv(pair_hessian(th, Xr, w))
    cov = A @ wcov(psi[None])[0] @ A / C
    return th, np.sqrt(np.diag(cov))


def make_population(scenario: Scenario, bandit: Bandit, rng: np.random.Generator, n_ctx: int, n_eval: int) -> Population:
    """``theta*`` from ``n_ctx`` contexts and an evaluation set of ``n_eval`` fresh contexts."""
    th, se = theta_star(scenario, bandit.sample_contexts(rng, n_ctx))
    ev = bandit.sample_contexts(rng, n_eval)
    P = scenario.p_star(ev.x[:, None, None, :], ev.phi[:, :, None, :], ev.phi[:, None, :, :])
    log_pi_star = log_policy_linear(th[None], ev.phi, ev.log_pi_ref, bandit.beta)[0]
    u = scenario.utility(ev.x[:, None, :], ev.phi)
    log_pi_u = None if u is None else log_policy(u, ev.log_pi_ref, bandit.beta)
    P_ref = np.matmul(P, ev.pi_ref[..., None])[..., 0]
    return Population(theta_star=th, theta_star_se=se, n_ctx=n_ctx, ctx=ev, P=P, log_pi_star=log_pi_star,
                      log_pi_u=log_pi_u, beta=bandit.beta, P_ref=P_ref)
