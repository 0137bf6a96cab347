"""Scenario zoo, auxiliary models and policies: exact properties and seeded label checks."""

import numpy as np
import pytest
from scipy.special import expit

import vrpo
from sim import SCENARIOS, Bandit, BanditSpec, Scenario, make_aux, make_scenario, register_scenario, sample_pairs
from sim.policy import log_policy, regret, win_rate
from sim.registry import AUX_MODELS

BANDIT = Bandit(BanditSpec(d=4, K=6, dx=3, scale=4.0, seed=3))
STRENGTH = {"probit": 0.7, "heavy-tail": 0.7, "mixture": 1.0, "flip": 0.2, "hetero": 1.0, "intransitive": 1.0,
            "nonlinear": 1.0, "position": 1.0, "ties": 2.0, "prompt-type": 1.0, "context-mixture": 1.0}


def _pairs(rng, size=500, d=4, dx=3):
    return rng.normal(size=(size, dx)), rng.normal(size=(size, d)), rng.normal(size=(size, d))


@pytest.mark.parametrize("name", [n for n in SCENARIOS.names() if n != "bt"])
def test_kappa_zero_is_exactly_bt(name):
    x, a, b = _pairs(np.random.default_rng(0))
    sc = make_scenario(f"{name}:0", BANDIT)
    np.testing.assert_allclose(sc.p_star(x, a, b), expit((a - b) @ BANDIT.theta_0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(sc.label_var(x, a, b, sc.p_star(x, a, b)),
                               expit((a - b) @ BANDIT.theta_0) * (1 - expit((a - b) @ BANDIT.theta_0)),
                               rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("name", SCENARIOS.names())
def test_antisymmetry_and_range(name):
    x, a, b = _pairs(np.random.default_rng(1))
    sc = make_scenario(f"{name}:{STRENGTH.get(name, 0)}", BANDIT)
    p_ab, p_ba = sc.p_star(x, a, b), sc.p_star(x, b, a)
    assert np.all((p_ab >= 0) & (p_ab <= 1))
    if sc.symmetric:
        np.testing.assert_allclose(p_ab + p_ba, 1.0, atol=1e-12)
    else:  # position bias: the first-shown response gains exactly kappa in the logit
        assert name == "position"
        ok = (np.minimum(p_ab, p_ba) > 1e-6) & (np.maximum(p_ab, p_ba) < 1 - 1e-6)
        assert ok.sum() > 100
        lo = lambda p: np.log(p / (1 - p))  # noqa: E731
        np.testing.assert_allclose(lo(p_ab[ok]) + lo(p_ba[ok]), 2 * sc.kappa, atol=1e-6)
    # misspecified for kappa > 0: not a BT model in the features (except where it is a rescaling)
    if name not in ("bt",):
        assert np.max(np.abs(p_ab - expit((a - b) @ BANDIT.theta_0))) > 1e-3


@pytest.mark.parametrize("name", ["ties", "flip", "mixture"])
def test_sampled_labels_have_mean_p_and_variance_label_var(name):
    """Seeded MC: mean and variance of sampled labels within 4.5 standard errors."""
    rng = np.random.default_rng(2)
    x, a, b = _pairs(rng, size=1)
    sc = make_scenario(f"{name}:{STRENGTH[name]}", BANDIT)
    a, b = np.repeat(a, 40000, 0), np.repeat(b, 40000, 0)
    x = np.repeat(x, 40000, 0)
    p = sc.p_star(x, a, b)
    Z = sc.sample_labels(rng, x, a, b, p)
    var = sc.label_var(x[:1], a[:1], b[:1], p[:1])[0]
    assert abs(Z.mean() - p[0]) < 4.5 * np.sqrt(var / Z.size)
    fourth = np.mean((Z - p[0]) ** 4)
    assert abs(Z.var() - var) < 4.5 * np.sqrt((fourth - var**2) / Z.size) + 1e-12
    if name == "ties":
        assert set(np.unique(Z)) <= {0.0, 0.5, 1.0} and np.mean(Z == 0.5) > 0.01


def test_prompt_type_family_weights_and_types():
    """prompt-type: the annotator type is a function of the prompt (w in {0, 1}, set by gamma . x);
    context-mixture: a smooth weight sigma(2 gamma . x). Both mix the two mixture-style types."""
    x, a, b = _pairs(np.random.default_rng(4))
    hard = make_scenario("prompt-type:1.0", BANDIT)
    soft = make_scenario("context-mixture:1.0", BANDIT)
    w = hard.weight(x)
    assert set(np.unique(w)) == {0.0, 1.0}
    np.testing.assert_array_equal(w, (x @ hard.gamma > 0).astype(float))
    t1, t2 = expit((a - b) @ hard.types[0]), expit((a - b) @ hard.types[1])
    np.testing.assert_allclose(hard.p_star(x, a, b), np.where(w == 1, t1, t2), rtol=1e-12)
    ws = soft.weight(x)
    np.testing.assert_allclose(ws, expit(2.0 * (x @ soft.gamma)), rtol=1e-12)
    assert 0 < ws.min() and ws.max() < 1
    for sc in (hard, soft):
        # types theta_0 +- kappa |theta_0| v with v orthogonal to theta_0, and unit gamma
        np.testing.assert_allclose(sc.types.mean(0), BANDIT.theta_0, rtol=1e-12)
        v = sc.types[0] - BANDIT.theta_0
        assert abs(v @ BANDIT.theta_0) < 1e-9 * np.linalg.norm(BANDIT.theta_0) ** 2
        np.testing.assert_allclose(np.linalg.norm(v), np.linalg.norm(BANDIT.theta_0), rtol=1e-12)
        assert np.linalg.norm(sc.gamma) == pytest.approx(1.0)
    # a context-independent reference: same prompt, two arms, the type does not depend on the arms
    assert np.all(hard.weight(np.repeat(x[:1], 5, 0)) == w[0])


def test_prompt_type_has_a_large_between_prompt_residual():
    """The family exists to make Var_x E[m|x] large (docs/method.md s3): its share of Var(m) is far
    above that of the plain two-type mixture (exact sums over arms, 400 contexts)."""
    from analysis.theory import population_theory

    spec = BanditSpec(d=4, K=6, dx=3, scale=6.0, seed=3)
    share = {}
    for s in ("mixture:1.0", "prompt-type:1.0"):
        th = population_theory(spec, s, "oracle", M=4, n_ctx=400, n_batches=4)
        same = th.Sigma(0.0) - th.Sigma(1.0)  # (1 - 1/M) E_x Var(m|x)
        fresh = th.variant(aux_prompts="fresh").Sigma(0.0) - th.variant(aux_prompts="fresh").Sigma(1.0)  # (1-1/M) Var(m)
        share[s] = 1.0 - np.trace(same) / np.trace(fresh)  # Var_x E[m|x] / Var(m)
    assert share["prompt-type:1.0"] > 0.15
    assert share["prompt-type:1.0"] > 2 * share["mixture:1.0"]


def test_bad_kappa_and_unknown_names():
    with pytest.raises(ValueError, match=r"kappa must lie in \[0.0, 0.4999\]"):
        make_scenario("flip:0.7", BANDIT)
    with pytest.raises(KeyError, match="unknown scenario 'nope'"):
        make_scenario("nope", BANDIT)
    with pytest.raises(ValueError, match="kappa must be a number"):
        make_scenario("mixture:strong", BANDIT)
    with pytest.raises(KeyError, match="unknown auxiliary model 'gpt'"):
        make_aux("gpt", make_scenario("bt", BANDIT))
    with pytest.raises(ValueError, match="needs a numeric argument"):
        make_aux("noisy:loud", make_scenario("bt", BANDIT))


def test_custom_scenario_registration_and_use():
    name = "test-shifted"
    if name not in SCENARIOS:
        @register_scenario(name)
        class Shifted(Scenario):
            def p_star(self, x, phi1, phi2):
                return expit(np.tanh(self.du(phi1, phi2)) * 3 * (1 + self.kappa))

    sc = make_scenario(f"{name}:0.5", BANDIT)
    assert sc.name == name and sc.kappa == 0.5
    data = sample_pairs(np.random.default_rng(0), BANDIT, sc, 50, 2)
    np.testing.assert_allclose(data.p_star, expit(np.tanh(data.X @ BANDIT.theta_0) * 4.5))
    with pytest.raises(ValueError, match="already registered"):
        register_scenario(name)(Scenario)


# ----------------------------------------------------------------- auxiliary models


def _batch(scenario="mixture:1.0", R=3, n=200, M=2, aux_prompts="same"):
    from sim.data import PairData

    sc = make_scenario(scenario, BANDIT)
    data = PairData.stack([sample_pairs(np.random.default_rng(r), BANDIT, sc, n, M, aux_prompts) for r in range(R)])
    return sc, data


@pytest.mark.parametrize("aux_prompts", ["same", "fresh"])
@pytest.mark.parametrize("spec", AUX_MODELS.names())
def test_aux_models_shapes_and_ranges(spec, aux_prompts):
    sc, data = _batch(aux_prompts=aux_prompts)
    rngs = [np.random.default_rng(10 + r) for r in range(3)]
    g, ga = make_aux(spec, sc)(data, rngs)
    assert g.shape == data.Z.shape and ga.shape == data.p_star_aux.shape
    assert np.all((g >= 0) & (g <= 1)) and np.all((ga >= 0) & (ga <= 1))


def test_oracle_noisy_constant_values():
    sc, data = _batch()
    rngs = lambda: [np.random.default_rng(r) for r in range(3)]  # noqa: E731
    g, ga = make_aux("oracle", sc)(data, rngs())
    np.testing.assert_array_equal(g, data.p_star)
    g0, _ = make_aux("noisy:0", sc)(data, rngs())
    np.testing.assert_allclose(g0, np.clip(data.p_star, 1e-12, 1 - 1e-12), rtol=1e-9)
    g1, _ = make_aux("noisy:1", sc)(data, rngs())
    g1b, _ = make_aux("noisy:1", sc)(data, rngs())
    np.testing.assert_array_equal(g1, g1b)  # reproducible from the replication generators
    assert np.std(g1 - data.p_star) > 0.01
    gc, gac = make_aux("constant:0.3", sc)(data, rngs())
    assert np.all(gc == 0.3) and np.all(gac == 0.3)


def test_learned_g_is_cross_fitted():
    """Changing the labels of fold k changes no prediction on fold k (nor on its extra pairs)."""
    sc, data = _batch(R=1, n=300)
    aux = make_aux("learned:5", sc)
    g, ga = aux(data, [None])
    fold0 = np.arange(300) % 5 == 0
    data.Z[0, fold0] = 1 - data.Z[0, fold0]
    g2, ga2 = aux(data, [None])
    np.testing.assert_allclose(g2[0, fold0], g[0, fold0], rtol=1e-12)
    np.testing.assert_allclose(ga2[0, fold0], ga[0, fold0], rtol=1e-12)
    assert np.max(np.abs(g2[0, ~fold0] - g[0, ~fold0])) > 1e-4


def test_self_g_makes_vr_equal_to_mle_exactly():
    """The BT-MLE solves the VR estimating equation when g is the MLE's own sigma(delta): the VR
    gradient (public vrpo.pair_score pieces) vanishes at the MLE, and Newton on L_VR started at
    theta = 0 (not at the MLE, where fit_bt's VR fit starts) lands on it."""
    from vrpo.variance import pair_hessian, pair_score

    sc, data = _batch(R=3, n=400)
    g, ga = make_aux("self", sc)(data, [None] * 3)
    mle = vrpo.fit_bt(data.X, data.Z, lam=0)
    R, n, M, d = data.X_aux.shape
    Xa, gaf = data.X_aux.reshape(R, n * M, d), ga.reshape(R, n * M)

    def grad(th):  # d L_VR / d theta at lam = 1: mean (g - Z) X + mean (s_a - g_a) X_a
        return (pair_score(th, data.X, data.Z) - pair_score(th, data.X, g)).mean(1) + pair_score(th, Xa, gaf).mean(1)

    assert np.max(np.abs(grad(mle.theta))) < 1e-10
    th = np.zeros((R, d))
    for _ in range(30):  # plain Newton on the (convex) lam = 1 objective; its Hessian is the extra pairs'
        th = th - np.linalg.solve(pair_hessian(th, Xa), grad(th)[..., None])[..., 0]
    np.testing.assert_allclose(th, mle.theta, atol=1e-9)


# ----------------------------------------------------------------- policies


def test_regret_identity_and_win_rate_symmetry():
    rng = np.random.default_rng(5)
    E, K, beta = 50, 5, 0.7
    log_ref = np.log(rng.dirichlet(np.ones(K), size=E))
    r_true, r_hat = rng.normal(size=(E, K)), rng.normal(size=(E, K))
    lp_opt, lp_hat = log_policy(r_true, log_ref, beta), log_policy(r_hat, log_ref, beta)

    def J(lp):  # J_r(pi) = E_pi[r] - beta KL(pi || pi_ref)
        pi = np.exp(lp)
        return np.mean(np.sum(pi * r_true, -1) - beta * np.sum(pi * (lp - log_ref), -1))

    assert regret(lp_hat, lp_opt, beta) == pytest.approx(J(lp_opt) - J(lp_hat), rel=1e-10)
    # win rate of a policy against itself under an antisymmetric p* is exactly 1/2
    P = expit(r_true[:, :, None] - r_true[:, None, :] + 0.3 * rng.normal(size=(E, K, K)) * 0)
    assert win_rate(lp_hat, lp_hat, P) == pytest.approx(0.5, abs=1e-12)
    assert win_rate(lp_opt, log_ref, P) > 0.5


def test_auto_lam_with_self_g_is_zero_not_round_off_noise():
    """With g = the fit's own sigma(delta) the correction has no variance; lam* must be 0,
    not the ratio of two solver residuals (found by the theory checks, /tmp/patches)."""
    sc, data = _batch(R=6, n=400)
    g, ga = make_aux("self", sc)(data, [None] * 6)
    mle = vrpo.fit_bt(data.X, data.Z, lam=0)
    fit = vrpo.fit_bt(data.X, data.Z, g, data.X_aux, ga, lam="auto", theta0=mle.theta + 1e-3)
    np.testing.assert_array_equal(fit.lam, 0.0)
    np.testing.assert_allclose(fit.theta, mle.theta, atol=1e-9)
