"""fit_bt: reference values, exact identities, batching, fast vs naive paths, bad input."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit

import vrpo
from vrpo import ConvergenceWarning, VRPOInputError, VarianceParts, fit_bt, pair_hessian, pair_score
from vrpo.fit import _eval, _objective_blocks

REF = Path(__file__).parent / "reference"
TOL_EST = 1e-6  # agreement with independent optimisers (their own stopping rules)
TOL_EXACT = 1e-10


def _data(seed=0, R=None, n=400, d=3, M=3, N=None, scale=1.0):
    rng = np.random.default_rng(seed)
    lead = () if R is None else (R,)
    theta = np.linspace(-1, 1, d) * scale
    X = rng.normal(size=lead + (n, d))
    p = expit(X @ theta + 0.5 * np.sin(3 * X[..., 0]))  # not BT in X: misspecified
    Z = (rng.random(p.shape) < p).astype(float)
    g = np.clip(p + 0.1 * rng.normal(size=p.shape), 0.01, 0.99)
    if N is None:
        Xa = rng.normal(size=lead + (n, M, d))
    else:
        Xa = rng.normal(size=lead + (N, d))
    pa = expit(Xa @ theta + 0.5 * np.sin(3 * Xa[..., 0]))
    ga = np.clip(pa + 0.1 * rng.normal(size=pa.shape), 0.01, 0.99)
    return X, Z, g, Xa, ga


# ----------------------------------------------------------------- reference values


def test_mle_matches_statsmodels_logit_with_hc0_covariance():
    """BT-MLE = logistic regression without intercept; sandwich = statsmodels' HC0."""
    sm = pytest.importorskip("statsmodels.api")
    X, Z, *_ = _data(1, n=500, d=4)
    ref = sm.Logit(Z, X).fit(disp=0, cov_type="HC0", method="newton", tol=1e-14, maxiter=100)
    res = fit_bt(X, Z, lam=0)
    np.testing.assert_allclose(res.theta, ref.params, atol=TOL_EST)
    np.testing.assert_allclose(res.cov, ref.cov_params(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(res.conf_int(0.05), ref.conf_int(0.05), atol=1e-6)


def test_mle_matches_stored_statsmodels_reference():
    """Stored numbers (tests/reference/statsmodels_logit_hc0.json, produced by statsmodels 0.15
    Logit(...).fit(cov_type='HC0') via tests/reference/make_reference.py) so the check also
    runs where statsmodels is not installed."""
    ref = json.loads((REF / "statsmodels_logit_hc0.json").read_text())
    X, Z = np.array(ref["X"]), np.array(ref["Z"])
    res = fit_bt(X, Z, lam=0)
    np.testing.assert_allclose(res.theta, ref["params"], atol=TOL_EST)
    np.testing.assert_allclose(res.cov, ref["cov_hc0"], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_vr_matches_ppi_py_logistic_point_estimate_fresh_prompts(lam):
    """VR with fresh-prompt extra pairs is PPI(++) logistic regression (ppi_py 0.2.3)."""
    ppi = pytest.importorskip("ppi_py")
    X, Z, g, Xa, ga = _data(2, n=600, d=3, N=2400)
    ref = ppi.ppi_logistic_pointestimate(X, Z, g, Xa, ga, lam=lam)
    res = fit_bt(X, Z, g, Xa, ga, lam=lam)
    np.testing.assert_allclose(res.theta, ref, atol=TOL_EST)


# ----------------------------------------------------------------- exact identities


def test_lam0_is_plain_bt_mle_whatever_g():
    X, Z, g, Xa, ga = _data(3)
    a = fit_bt(X, Z, lam=0)
    b = fit_bt(X, Z, g, Xa, ga, lam=0)
    np.testing.assert_array_equal(a.theta, b.theta)
    np.testing.assert_array_equal(a.cov, b.cov)
    # plain MLE score equation holds at the solution
    np.testing.assert_allclose(((expit(X @ a.theta) - Z)[:, None] * X).sum(0), 0, atol=1e-9)


def test_batched_equals_one_at_a_time():
    X, Z, g, Xa, ga = _data(4, R=5, n=300)
    lam = np.array([0.0, 0.3, 1.0, 1.0, 0.6])
    for lam_arg in (1.0, "auto", lam):
        batch = fit_bt(X, Z, g, Xa, ga, lam=lam_arg)
        for r in range(5):
            one = fit_bt(X[r], Z[r], g[r], Xa[r], ga[r], lam=lam_arg if not isinstance(lam_arg, np.ndarray) else lam[r])
            np.testing.assert_allclose(batch.theta[r], one.theta, atol=TOL_EXACT)
            np.testing.assert_allclose(batch.cov[r], one.cov, rtol=1e-8, atol=1e-14)
            assert batch.lam[r] == pytest.approx(float(one.lam), abs=1e-10)
    # two leading axes
    X2, Z2 = X.reshape(5, 1, 300, 3), Z.reshape(5, 1, 300)
    res = fit_bt(X2, Z2, lam=0)
    assert res.theta.shape == (5, 1, 3) and res.cov.shape == (5, 1, 3, 3) and res.conf_int().shape == (5, 1, 3, 2)


@pytest.mark.parametrize("mode", ["same", "fresh"])
def test_gradient_and_hessian_against_finite_differences(mode):
    X, Z, g, Xa, ga = _data(5, R=2, n=200, N=None if mode == "same" else 500)
    R, n, d = X.shape
    Xa_rows = Xa.reshape(R, -1, d)
    blocks = _objective_blocks(X, Z, g, Xa_rows, ga.reshape(R, -1), np.array([0.7, 1.0]))
    theta = np.random.default_rng(0).normal(size=(R, d)) * 0.5
    ridge = 0.01
    f, grad, hess = _eval(blocks, theta, ridge, 2)
    # the objective is vr_objective (+ ridge): check the value against the one definition
    for r in range(R):
        lam = [0.7, 1.0][r]
        want = vrpo.vr_objective(X[r] @ theta[r], Z[r], g[r], Xa_rows[r] @ theta[r], ga[r].reshape(-1), lam)
        assert f[r] == pytest.approx(want + 0.5 * ridge * theta[r] @ theta[r], rel=1e-12)
    h = 1e-6
    for j in range(d):
        e = np.zeros(d)
        e[j] = h
        fp, gp, _ = _eval(blocks, theta + e, ridge, 1)
        fm, gm, _ = _eval(blocks, theta - e, ridge, 1)
        np.testing.assert_allclose((fp - fm) / (2 * h), grad[:, j], rtol=1e-6, atol=1e-9)
        # the Hessian is formed in float32 (it only steers Newton), hence rtol 1e-5
        np.testing.assert_allclose((gp - gm) / (2 * h), hess[:, :, j], rtol=1e-5, atol=1e-7)


def test_fast_sandwich_equals_naive_scores_same_and_fresh():
    """The fit's covariance (scores never materialised) equals VarianceParts built from
    explicit per-prompt scores, clustered by prompt for shared-prompt pairs."""
    for mode in ("same", "fresh"):
        X, Z, g, Xa, ga = _data(6, n=300, N=None if mode == "same" else 900)
        res = fit_bt(X, Z, g, Xa, ga, lam=0.8)
        th, n = res.theta, X.shape[0]
        a = pair_score(th, X, Z)
        b = -pair_score(th, X, g)
        if mode == "same":
            M = Xa.shape[1]
            b = b + pair_score(th, Xa.reshape(-1, 3), ga.reshape(-1)).reshape(n, M, 3).mean(1)
            H = (pair_hessian(th, X) + M * pair_hessian(th, Xa.reshape(-1, 3))) / (1 + M)
            parts = VarianceParts.from_scores(H, a, b)
        else:
            N = Xa.shape[0]
            H = (n * pair_hessian(th, X) + N * pair_hessian(th, Xa)) / (n + N)
            parts = VarianceParts.from_scores(H, a, b, pair_score(th, Xa, ga), n_over_N=n / N)
        np.testing.assert_allclose(res.cov, parts.cov(0.8), rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(res.hessian, H, rtol=1e-12)


def test_auto_lam_minimises_estimated_trace_and_is_clipped():
    X, Z, g, Xa, ga = _data(7, n=500)
    pilot = fit_bt(X, Z, g, Xa, ga, lam=0.0)
    res = fit_bt(X, Z, g, Xa, ga, lam="auto")
    # lam* from the parts at the pilot (BT-MLE) point: check against a grid of tr V(lam)
    from vrpo.fit import _variance_parts

    parts, _ = _variance_parts(pilot.theta[None], X[None], Z[None], g[None], Xa[None], ga[None], "same", 0.0)
    grid = np.linspace(0, 1, 2001)
    tr = [np.trace(parts.V(l)[0]) for l in grid]
    assert float(res.lam) == pytest.approx(grid[int(np.argmin(tr))], abs=1e-3)
    assert 0.0 <= float(res.lam) <= 1.0
    # unclipped value is the closed form -tr(A S1 A) / (2 tr(A S2 A))
    A = parts.A[0]
    want = -np.trace(A @ parts.S1[0] @ A) / (2 * np.trace(A @ parts.S2[0] @ A))
    assert float(parts.lam_opt(clip=None)[0]) == pytest.approx(want, rel=1e-12)
    # a useless g (constant 1/2, uncorrelated with the labels) gets lam near 0
    res0 = fit_bt(X, Z, np.full_like(g, 0.5), Xa, np.full_like(ga, 0.5), lam="auto")
    assert float(res0.lam) < 0.1


def test_conf_int_is_wald():
    X, Z, *_ = _data(8)
    res = fit_bt(X, Z, lam=0)
    ci = res.conf_int(0.1)
    se = np.sqrt(np.diag(res.cov))
    np.testing.assert_allclose(ci[:, 0], res.theta - 1.6448536269514722 * se, rtol=1e-12)
    np.testing.assert_allclose(ci[:, 1], res.theta + 1.6448536269514722 * se, rtol=1e-12)
    with pytest.raises(VRPOInputError, match="alpha"):
        res.conf_int(1.5)


def test_ridge_solves_penalised_score_equation():
    X, Z, *_ = _data(9, n=100)
    res = fit_bt(X, Z, lam=0, ridge=0.5)
    score = ((expit(X @ res.theta) - Z)[:, None] * X).mean(0) + 0.5 * res.theta
    np.testing.assert_allclose(score, 0, atol=1e-10)


def test_population_fit_recovers_bt_parameter_exactly():
    rng = np.random.default_rng(10)
    X = rng.normal(size=(2000, 3))
    theta = np.array([1.0, -0.5, 0.25])
    w = rng.random(2000)
    th = vrpo.fit_bt_population(X, expit(X @ theta), w)
    np.testing.assert_allclose(th, theta, atol=1e-9)


# ----------------------------------------------------------------- failures and bad input


def test_separable_sample_is_flagged_not_nan():
    rng = np.random.default_rng(11)
    X = rng.normal(size=(2, 40, 2))
    Z = (X[..., 0] > 0).astype(float)  # replication 0: perfectly separable
    Z[1] = (rng.random(40) < 0.5).astype(float)  # replication 1: fine
    with pytest.warns(ConvergenceWarning, match="1 of 2 replication.*separable samples"):
        res = fit_bt(X, Z, lam=0, max_iter=50)
    assert res.converged.tolist() == [False, True]
    assert np.all(np.isfinite(res.theta))
    assert np.all(np.isnan(res.cov[0])) and np.all(np.isfinite(res.cov[1]))  # no minimiser, no sandwich


def test_unbounded_vr_objective_is_flagged():
    """lam = 1 with g = 1/2: the labelled part of L_VR is linear in theta, so a sample where
    it outgrows the extra-pair part has no minimiser; the fit must say so."""
    rng = np.random.default_rng(12)
    X = rng.normal(size=(60, 2))
    Z = (X[:, 0] > 0).astype(float)
    Xa = rng.normal(size=(60, 1, 2)) * 0.01  # tiny extra-pair margins: |X_aux theta| grows slowly
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = fit_bt(X, Z, np.full(60, 0.5), Xa, np.full((60, 1), 0.5), lam=1.0)
    assert not bool(res.converged)
    assert np.all(np.isfinite(res.theta)) and np.max(np.abs(res.theta)) <= 1e6
    assert np.all(np.isnan(res.cov))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(X=np.ones((5,)), Z=np.ones(5)), r"X must have shape \(\.\.\., n, d\)"),
        (dict(X=np.ones((2, 3)), Z=np.ones(2)), "need at least d = 3 labelled pairs, got n = 2"),
        (dict(X=np.ones((5, 2)), Z=np.ones(4)), "Z must have shape"),
        (dict(X=np.ones((5, 2)), Z=np.array([0, 1, 2, 0, 1.0])), r"Z must lie in \[0, 1\]"),
        (dict(X=np.full((5, 2), np.nan), Z=np.ones(5)), "X contains 10 NaN"),
        (dict(X=np.ones((5, 2)), Z=np.ones(5), lam=1.0), "missing g, X_aux, g_aux"),
        (dict(X=np.ones((5, 2)), Z=np.ones(5), lam="optimal"), "lam must be a number >= 0 or 'auto'"),
        (dict(X=np.ones((5, 2)), Z=np.ones(5), lam=-1.0), "lam must be >= 0"),
        (dict(X=np.ones((5, 2)), Z=np.ones(5), g=np.full(5, 1.5), X_aux=np.ones((5, 2, 2)),
              g_aux=np.ones((5, 2))), r"g must lie in \[0, 1\]"),
        (dict(X=np.ones((5, 2)), Z=np.ones(5), g=np.ones(5), X_aux=np.ones((4, 2, 2)), g_aux=np.ones((4, 2))),
         r"X_aux for same-prompt pairs must have shape"),
        (dict(X=np.ones((5, 2)), Z=np.ones(5), g=np.ones(5), X_aux=np.ones((7, 3)), g_aux=np.ones(7)),
         "X_aux must end in the feature axis d = 2"),
        (dict(X=np.ones((5, 2)), Z=np.ones(5), g=np.ones(5), X_aux=np.ones((7, 2)), g_aux=np.ones(6)),
         "g_aux must have shape"),
        (dict(X=np.ones((5, 2)), Z=np.ones(5), g=np.ones(5), X_aux=np.ones((7, 2)), g_aux=np.full(7, np.nan)),
         "g_aux contains 7 NaN"),
    ],
)
def test_bad_input_errors_name_the_problem(kwargs, match):
    with pytest.raises(VRPOInputError, match=match):
        fit_bt(**kwargs)


def test_bad_ridge():
    with pytest.raises(VRPOInputError, match="ridge"):
        fit_bt(np.eye(3), np.ones(3), lam=0, ridge=-1)


def test_auto_lam_at_zero_is_exactly_mle():
    """Where power tuning picks lam = 0 the fit is BT-MLE exactly (theta and covariance)."""
    X, Z, g, Xa, ga = _data(13, R=3, n=300)
    # g = 1 - Z makes the correction positively correlated with the MLE score
    # (Cov(a, b) = E[s(1-s) X X^T] > 0), so lam* < 0 and is clipped to 0
    auto = fit_bt(X, Z, 1 - Z, Xa, np.full_like(ga, 0.5), lam="auto")
    mle = fit_bt(X, Z, lam=0)
    assert np.all(auto.lam == 0)
    np.testing.assert_allclose(auto.theta, mle.theta, atol=TOL_EXACT)
    np.testing.assert_allclose(auto.cov, mle.cov, rtol=1e-9)
