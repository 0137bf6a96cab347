"""The mutants of analysis.mutants: each is the wrong formula it claims to be, and differs from
the correct one where (and only where) the theory says it should."""

from __future__ import annotations

import numpy as np
import pytest

import vrpo
from analysis.mutants import MUTANTS, cov_labelled_hessian, cov_unclustered, model_based_trV, naive_lam, theory_mutant
from analysis.theory import policy_G, population_theory, theory_contexts
from sim.aux_models import make_aux
from sim.bandit import Bandit, BanditSpec
from sim.data import PairData, sample_pairs
from sim.scenarios import make_scenario
from vrpo.variance import pair_hessian

SPEC = BanditSpec(d=3, K=5, dx=2, scale=6.0, seed=3)
N_CTX = 400
RTOL = 1e-10


@pytest.fixture(scope="module")
def prompt_type():
    return population_theory(SPEC, "prompt-type:1.0", ["oracle", "noisy:2.0"], M=4, n_ctx=N_CTX, n_batches=4)


def test_no_inv_M_drops_exactly_the_1_over_M_share(prompt_type):
    th = prompt_type[0]
    mu = theory_mutant(th, "no-1/M")
    np.testing.assert_allclose(mu.parts.S2, th.parts.S2 / (1 + 1 / 4), rtol=RTOL)
    np.testing.assert_allclose(mu.parts.S1, th.parts.S1, rtol=RTOL)
    np.testing.assert_allclose(mu.parts.S0, th.parts.S0, rtol=RTOL)
    # oracle g: the mutant removes all of E_x Var(m|x) instead of (1 - 1/M) of it
    gap_true = np.trace(th.Sigma(0.0) - th.Sigma(1.0))
    gap_mut = np.trace(mu.Sigma(0.0) - mu.Sigma(1.0))
    assert gap_mut == pytest.approx(gap_true / (1 - 1 / 4), rel=1e-9)


def test_wrong_prompts_swaps_the_designs(prompt_type):
    th = prompt_type[0]
    fresh = th.variant(aux_prompts="fresh")
    mu = theory_mutant(th, "wrong-prompts")
    np.testing.assert_allclose(mu.parts.S2, fresh.parts.S2, rtol=RTOL)
    back = theory_mutant(fresh, "wrong-prompts")
    np.testing.assert_allclose(back.parts.S1, th.parts.S1, rtol=RTOL)
    # the fresh formula also removes the between-prompt term: it predicts a smaller VR variance
    assert mu.trV(1.0) < th.trV(1.0)


def test_naive_lam_equals_clustered_for_the_oracle_only(prompt_type):
    """With g = p* both PPI++ lam* are M/(M+1); with a noisy g they differ (the point of the mutant)."""
    oracle, noisy = prompt_type
    assert naive_lam(oracle) == pytest.approx(0.8, rel=1e-9)
    assert oracle.lam_opt(clip=None) == pytest.approx(0.8, rel=1e-9)
    assert abs(naive_lam(noisy) - noisy.lam_opt(clip=None)) > 1e-3


def test_G_ref_is_G_under_pi_ref():
    th = population_theory(SPEC, "mixture:1.0", "oracle", n_ctx=N_CTX, n_batches=4)
    ctx = theory_contexts(SPEC, "mixture:1.0", N_CTX)
    G_ref = policy_G(np.zeros(SPEC.d), ctx.phi, ctx.log_pi_ref, SPEC.beta)
    np.testing.assert_allclose(theory_mutant(th, "G-ref").G, G_ref, rtol=1e-9)
    assert model_based_trV(th) == pytest.approx(np.trace(np.linalg.inv(th.H)), rel=1e-9)


@pytest.fixture(scope="module")
def same_prompt_fit():
    bandit = Bandit(SPEC)
    scen = make_scenario("prompt-type:1.0", bandit)
    data = PairData.stack([sample_pairs(np.random.default_rng(r), bandit, scen, 300, 3) for r in range(4)])
    g, ga = make_aux("noisy:1.0", scen)(data, [np.random.default_rng(10 + r) for r in range(4)])
    fit = vrpo.fit_bt(data.X, data.Z, g, data.X_aux, ga, lam=0.7)
    return data, g, ga, fit


def test_unclustered_sandwich_is_the_fresh_prompt_sandwich_on_flattened_pairs(same_prompt_fit):
    """Identity: treating the n M extra pairs as fresh prompts gives fit_bt's own fresh-prompt
    meat; with fit_bt's (pooled) Hessian the two covariances coincide."""
    data, g, ga, fit = same_prompt_fit
    C = cov_unclustered(fit, data.X, data.Z, g, data.X_aux, ga)
    R, n, M, d = data.X_aux.shape
    fresh = vrpo.fit_bt(data.X, data.Z, g, data.X_aux.reshape(R, n * M, d), ga.reshape(R, n * M), lam=0.7,
                        theta0=fit.theta)
    # same theta (the objectives coincide), same rows: fresh meat; rescale its bread to fit's pooled Hessian
    np.testing.assert_allclose(fresh.theta, fit.theta, atol=1e-8)
    P = fresh.parts
    ref = vrpo.VarianceParts(A=fit.parts.A, S0=P.S0, S1=P.S1, S2=P.S2, n=P.n).cov(0.7)
    np.testing.assert_allclose(C, ref, rtol=1e-6)
    assert not np.allclose(C, fit.cov, rtol=1e-3)  # it is not the clustered sandwich


def test_labelled_hessian_sandwich_changes_only_the_bread(same_prompt_fit):
    data, g, ga, fit = same_prompt_fit
    C = cov_labelled_hessian(fit, data.X)
    A_lab = np.linalg.inv(pair_hessian(fit.theta, data.X))
    P = fit.parts
    ref = A_lab @ (P.S0 + 0.7 * P.S1 + 0.49 * P.S2) @ A_lab / P.n
    np.testing.assert_allclose(C, 0.5 * (ref + np.swapaxes(ref, -1, -2)), rtol=1e-10)
    assert not np.allclose(C, fit.cov, rtol=1e-3)


def test_every_mutant_is_described():
    assert set(MUTANTS) == {"no-1/M", "wrong-prompts", "naive-lam", "model-based", "G-ref", "labelled-hessian",
                            "unclustered"}
    for m in MUTANTS.values():
        assert m.kind in ("theory", "estimator") and m.what and m.statistic
