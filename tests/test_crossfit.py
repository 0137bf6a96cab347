"""One cross-fitting helper (vrpo.crossfit) for the bandit ``learned`` g and the HH experiment's g."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit

import vrpo
from llm.hh_reward import learned_g
from sim.aux_models import AuxModel, make_aux, quadratic_pair_features
from sim.bandit import Bandit, BanditSpec
from sim.data import PairData, sample_pairs
from sim.scenarios import make_scenario
from vrpo.crossfit import cross_fit_logistic, fold_of

SPEC = BanditSpec(d=3, K=5, dx=2, scale=3.0, seed=4)


def _pairs(n, M, aux_prompts, R=3):
    bandit = Bandit(SPEC)
    scen = make_scenario("mixture:1.0", bandit)
    data = PairData.stack([sample_pairs(np.random.default_rng(r), bandit, scen, n, M, aux_prompts) for r in range(R)])
    return scen, data


@pytest.mark.parametrize("n", [60, 63])  # equal folds, and folds of two sizes
def test_bandit_and_hh_callers_agree_on_the_same_data(n):
    """sim's ``learned:K`` and llm.hh_reward.learned_g give the same g on the same features,
    labels, extra pairs, K and ridge (fresh prompts: the HH design)."""
    scen, data = _pairs(n, 2, "fresh")
    aux = make_aux("learned:4", scen)
    g_sim, ga_sim = aux(data, [np.random.default_rng(0)] * 3)
    F = quadratic_pair_features(data.x, data.phi1, data.phi2)
    Fa = quadratic_pair_features(data.x_aux, data.phi1_aux, data.phi2_aux)
    g_hh, ga_hh = learned_g(F, data.Z, Fa, 4, aux.ridge)
    np.testing.assert_array_equal(g_sim, g_hh)
    np.testing.assert_array_equal(ga_sim, ga_hh)


@pytest.mark.parametrize("n,aux_prompts", [(60, "same"), (63, "same"), (63, "fresh")])
def test_batched_cross_fit_equals_fold_by_fold_fits(n, aux_prompts):
    """The batched helper against the naive loop: one ridge BT fit per fold and replication."""
    _, data = _pairs(n, 3, aux_prompts, R=2)
    F = quadratic_pair_features(data.x, data.phi1, data.phi2)
    Fa = quadratic_pair_features(data.x_aux, data.phi1_aux, data.phi2_aux)
    K, ridge = 5, 1e-2
    g, ga = cross_fit_logistic(F, data.Z, Fa, K, ridge=ridge)
    fold = fold_of(n, K)
    assert np.bincount(fold).max() - np.bincount(fold).min() <= 1
    for r in range(F.shape[0]):
        w = [vrpo.fit_bt(F[r, fold != k], data.Z[r, fold != k], lam=0, ridge=ridge, warn=False).theta
             for k in range(K)]
        for i in range(n):
            assert g[r, i] == pytest.approx(expit(F[r, i] @ w[fold[i]]), rel=1e-9)  # not trained on pair i
            if aux_prompts == "same":
                np.testing.assert_allclose(ga[r, i], expit(Fa[r, i] @ w[fold[i]]), rtol=1e-9)
        if aux_prompts == "fresh":
            np.testing.assert_allclose(ga[r], np.mean([expit(Fa[r] @ wk) for wk in w], axis=0), rtol=1e-9)


def test_cross_fit_rejects_bad_shapes_and_folds():
    F, Z = np.zeros((2, 10, 3)), np.zeros((2, 10))
    with pytest.raises(ValueError, match="k_folds"):
        cross_fit_logistic(F, Z, np.zeros((2, 4, 3)), 1, ridge=0.1)
    with pytest.raises(ValueError, match="F_aux"):
        cross_fit_logistic(F, Z, np.zeros((2, 4, 2)), 2, ridge=0.1)


def test_population_limit_is_required_of_a_random_plugin():
    """A user g with its own noise and no population_limit gets a clear error, not a wrong limit."""

    class Jitter(AuxModel):
        name = "jitter"

        def predict(self, data, rngs):
            return data.p_star, data.p_star_aux

    scen, _ = _pairs(30, 1, "same", R=1)
    with pytest.raises(NotImplementedError, match="population limit"):
        Jitter(None, scen).population_limit(None, np.zeros((1, 5, 5)), None)
