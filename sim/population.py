"""Population quantities of a scenario: ``theta*`` and a fixed evaluation set.

``theta*`` minimises ``E[l(delta_theta, p*)]`` (the KL projection of ``p*`` on
the BT family, METHOD.md s2). Over the arms the expectation is an exact sum
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


def theta_star(scenario: Scenario, ctx: Contexts):
    """``(theta*, se)`` from the contexts ``ctx`` (exact over arms)."""
    X, P, W, _ = all_pairs(scenario, ctx)
    C, K, _, d = X.shape
    Xr = X.reshape(C * K * K, d)
    w = (W / C).reshape(-1)
    th = vrpo.fit_bt_population(Xr, P.reshape(-1), w)
    # clustered sandwich over contexts: psi_c = sum_ab W_ab (s - p*) X_ab
    psi = np.einsum("ckl,ckld->cd", W, pair_score(th, X.reshape(C, K * K, d), P.reshape(C, K * K)).reshape(C, K, K, d))
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
    return Population(theta_star=th, theta_star_se=se, n_ctx=n_ctx, ctx=ev, P=P, log_pi_star=log_pi_star,
                      log_pi_u=log_pi_u, beta=bandit.beta)
