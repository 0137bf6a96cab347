"""fit_bt never reports a confident wrong number: separation, rank deficiency, bad input.

Issue 8 items 1 and 2 and the estimator's "smaller ones". A sample without a finite
minimiser (checked against an independent LP, ``tests/lp_oracle.py``) or with zero or
collinear feature columns must come back ``converged = False`` with a status naming
the cause and a NaN covariance, never as a converged fit with huge ``theta`` and
finite standard errors.
"""

import warnings

import numpy as np
import pytest
from scipy.special import expit

from lp_oracle import no_minimiser, separable_labels
from vrpo import ConvergenceWarning, VRPOInputError, fit_bt


def _fit_quiet(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return fit_bt(*args, **kw)


def _overlapping(seed=0, n=200, d=3, R=None):
    rng = np.random.default_rng(seed)
    lead = () if R is None else (R,)
    X = rng.normal(size=lead + (n, d))
    Z = (rng.random(lead + (n,)) < expit(X @ np.linspace(-1, 1, d))).astype(float)
    return X, Z


# ----------------------------------------------------------------- item 1: separation


def test_issue_example_separable_replications_are_never_converged():
    """The issue's reproduction: labels are the sign of a linear score, so every
    replication is separable; 25 of 40 used to come back converged with |theta| ~ 1e3."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 200, 5))
    w = rng.normal(size=(40, 5))
    Z = (np.einsum("rnd,rd->rn", X, w) > 0).astype(float)
    assert all(separable_labels(X[r], Z[r]) for r in range(40))
    with pytest.warns(ConvergenceWarning, match=r"40 of 40 .*40 separable"):
        res = fit_bt(X, Z, lam=0)
    assert not res.converged.any()
    assert (res.status == "separable").all()
    assert np.isnan(res.cov).all() and np.isnan(res.se).all()
    assert np.isfinite(res.theta).all() and np.abs(res.theta).max() <= 1e6


@pytest.mark.parametrize("seed", range(6))
def test_n_equals_d_binary_labels_never_give_negative_variances(seed):
    """n = d = 5 with 0/1 labels is separable for almost every design (X is invertible):
    it used to report converged with negative diagonal covariance entries."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(5, 5))
    Z = (rng.random(5) < 0.5).astype(float)
    res = _fit_quiet(X, Z, lam=0)
    assert separable_labels(X, Z)
    assert not res.converged and res.status == "separable"
    assert np.isnan(res.cov).all()


def test_soft_label_quasi_separation_is_detected():
    """Soft labels separate too: 0/1 rows on either side of a hyperplane on which every
    soft-labelled row lies (the objective still decreases along its normal)."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(60, 3))
    soft = np.arange(60) < 20
    X[soft, 0] = 0.0
    Z = np.where(X[:, 0] > 0, 1.0, 0.0)
    Z[soft] = rng.uniform(0.2, 0.8, size=20)
    assert separable_labels(X, Z)
    res = _fit_quiet(X, Z, lam=0)
    assert not res.converged and res.status == "separable" and np.isnan(res.cov).all()
    # one soft-labelled row off the hyperplane breaks the separation
    X[0, 0] = 0.5
    assert not separable_labels(X, Z)
    res = fit_bt(X, Z, lam=0)
    assert res.converged and res.status == "converged"


def test_ties_and_open_interval_labels_always_have_a_minimiser():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(3, 30, 4))
    Z = rng.uniform(0.01, 0.99, size=(3, 30))
    Z[1] = 0.5  # all ties
    res = fit_bt(X, Z, lam=0)
    assert res.converged.all() and (res.status == "converged").all()
    np.testing.assert_allclose(res.theta[1], 0.0, atol=1e-12)


def test_nearly_separable_overlapping_sample_still_converges():
    """One mislabelled point breaks the separation: the MLE exists (large, finite) and the
    fit must certify it rather than flag it."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(200, 2))
    Z = (X[:, 0] > 0).astype(float)
    i = int(np.argmin(np.abs(X[:, 0] - 0.3)))
    Z[i] = 0.0
    assert not separable_labels(X, Z)
    res = fit_bt(X, Z, lam=0)
    assert res.converged and res.status == "converged"
    score = ((expit(X @ res.theta) - Z)[:, None] * X).sum(0)
    np.testing.assert_allclose(score, 0.0, atol=1e-8)
    assert np.all(np.diag(res.cov) > 0)


def test_vr_objective_without_minimiser_is_unbounded_status():
    """lam = 1, constant g = 1/2 and tiny extra-pair margins: the linear labelled part
    outgrows the curved extra-pair part; the LP finds the descent direction."""
    rng = np.random.default_rng(12)
    X = rng.normal(size=(60, 2))
    Z = (X[:, 0] > 0).astype(float)
    Xa = rng.normal(size=(60, 1, 2)) * 0.01
    g, ga = np.full(60, 0.5), np.full((60, 1), 0.5)
    c = np.concatenate([np.zeros(60), np.full(60, 1 / 60)])
    t = np.concatenate([(Z - g) / 60, ga[:, 0] / 60])
    assert no_minimiser(np.concatenate([X, Xa[:, 0]]), c, t)
    res = _fit_quiet(X, Z, g, Xa, ga, lam=1.0)
    assert not res.converged and res.status == "unbounded" and np.isnan(res.cov).all()
    assert np.abs(res.theta).max() <= 1e6


def test_separated_pilot_flags_power_tuned_fit():
    """lam = 'auto' estimates lam at the BT-MLE pilot: no pilot, no lam, no estimate."""
    rng = np.random.default_rng(6)
    X = rng.normal(size=(2, 40, 2))
    Z = (X[..., 0] > 0).astype(float)
    Z[1] = (rng.random(40) < 0.5).astype(float)
    Xa = rng.normal(size=(2, 40, 2, 2))
    res = _fit_quiet(X, Z, np.full((2, 40), 0.5), Xa, np.full((2, 40, 2), 0.5), lam="auto")
    assert res.converged.tolist() == [False, True]
    assert res.status[0] == "separable" and np.isnan(res.cov[0]).all() and np.isfinite(res.cov[1]).all()


# ----------------------------------------------------------------- item 2: rank deficiency


@pytest.mark.parametrize("kind", ["zero", "collinear", "duplicate"])
def test_rank_deficient_design_is_flagged_with_nan_covariance(kind):
    X, Z = _overlapping(7, n=300, d=3)
    if kind == "zero":
        X[:, 2] = 0.0
    elif kind == "collinear":
        X[:, 2] = X[:, 0] - 2.0 * X[:, 1]
    else:
        X[:, 2] = X[:, 1]
    with pytest.warns(ConvergenceWarning, match="rank_deficient"):
        res = fit_bt(X, Z, lam=0)
    assert not res.converged and res.status == "rank_deficient"
    assert np.isnan(res.cov).all() and np.isnan(res.conf_int()).all()
    assert np.isfinite(res.theta).all()


def test_rank_deficiency_is_per_replication_and_covers_vr():
    rng = np.random.default_rng(8)
    X = rng.normal(size=(3, 200, 3))
    Z = (rng.random((3, 200)) < expit(X[..., 0])).astype(float)
    Xa = rng.normal(size=(3, 200, 2, 3))
    X[1, :, 2] = 2.0 * X[1, :, 0]
    Xa[1, ..., 2] = 2.0 * Xa[1, ..., 0]
    g, ga = expit(X[..., 0]), expit(Xa[..., 0])
    for lam in (0.0, 0.5, 1.0, "auto"):
        res = _fit_quiet(X, Z, g, Xa, ga, lam=lam)
        assert res.status.tolist() == ["converged", "rank_deficient", "converged"], lam
        assert np.isnan(res.cov[1]).all() and np.isfinite(res.cov[[0, 2]]).all()


# ----------------------------------------------------------------- smaller ones (estimator)


def test_lam_coord_out_of_range_is_named():
    X, Z = _overlapping(9, n=50)
    args = (X, Z, np.full(50, 0.5), X[:, None, :], np.full((50, 1), 0.5))
    for bad in (3, -4, 1.5, "0"):
        with pytest.raises(VRPOInputError, match=r"lam_coord must be an integer in \[0, 3\)"):
            fit_bt(*args, lam="auto", lam_coord=bad)
    assert fit_bt(*args, lam="auto", lam_coord=-1).lam.shape == ()  # negative indices count from the end


def test_empty_batch_returns_empty_results():
    res = fit_bt(np.zeros((0, 10, 2)), np.zeros((0, 10)), lam=0)
    assert res.theta.shape == (0, 2) and res.cov.shape == (0, 2, 2) and res.converged.shape == (0,)
    assert res.status.shape == (0,) and res.conf_int().shape == (0, 2, 2)
    res = fit_bt(np.zeros((0, 10, 2)), np.zeros((0, 10)), np.zeros((0, 10)), np.zeros((0, 30, 2)), np.zeros((0, 30)),
                 lam="auto")
    assert res.theta.shape == (0, 2) and res.lam.shape == (0,)


def test_wrong_shape_theta0_is_named():
    X, Z = _overlapping(10, n=50, R=4)
    for bad in (np.zeros(4), np.zeros((3, 3)), np.zeros((4, 1, 3))):
        with pytest.raises(VRPOInputError, match=r"theta0 must have shape \(3,\) or \(4, 3\)"):
            fit_bt(X, Z, lam=0, theta0=bad)
    np.testing.assert_allclose(fit_bt(X, Z, lam=0, theta0=np.ones(3)).theta, fit_bt(X, Z, lam=0).theta, atol=1e-9)


def test_theta0_beyond_theta_max_is_rejected():
    X, Z = _overlapping(11, n=50)
    with pytest.raises(VRPOInputError, match=r"theta0.*theta_max = 1e\+06"):
        fit_bt(X, Z, lam=0, theta0=np.full(3, 1e7))
    with pytest.raises(VRPOInputError, match="theta_max must be"):
        fit_bt(X, Z, lam=0, theta_max=-1.0)


def test_label_just_above_one_is_shown_with_its_value():
    X, Z = _overlapping(12, n=50)
    Z = np.where(Z > 0, 1 + 1e-7, 0.0)
    with pytest.raises(VRPOInputError, match=r"Z must lie in \[0, 1\].*1\.0000001"):
        fit_bt(X, Z, lam=0)


@pytest.mark.parametrize(
    "X, match",
    [
        (None, "X is required"),
        ([[1.0, None], [0.0, 1.0]], "X must be a numeric array"),
        ([["a", "b"], ["c", "d"]], "X must be a numeric array"),
        (np.ones((4, 2)) + 1j, "X is complex"),
    ],
)
def test_none_object_string_and_complex_inputs_are_named(X, match):
    with pytest.raises(VRPOInputError, match=match):
        fit_bt(X, np.ones(np.shape(X)[0] if X is not None else 2), lam=0)


def test_nan_in_extra_pair_features_is_counted():
    X, Z = _overlapping(15, n=40, R=3)
    Xa = np.random.default_rng(0).normal(size=(3, 40, 2, 3))
    Xa[2, 5, 1, 0] = np.nan
    Xa[2, 7, 0, 2] = np.inf
    with pytest.raises(VRPOInputError, match="X_aux contains 2 NaN or infinite"):
        fit_bt(X, Z, np.full((3, 40), 0.5), Xa, np.full((3, 40, 2), 0.5), lam=1.0)


def test_complex_labels_and_aux_inputs_are_rejected():
    X, Z = _overlapping(13, n=40)
    with pytest.raises(VRPOInputError, match="Z is complex"):
        fit_bt(X, Z + 0j, lam=0)
    with pytest.raises(VRPOInputError, match="g_aux is complex"):
        fit_bt(X, Z, np.full(40, 0.5), X[:, None], np.full((40, 1), 0.5) + 0j, lam=1)


def test_tiny_feature_scale_is_not_called_separable():
    """Features at scale 1e-8 put the MLE at ~1e8 > theta_max: that is a scaling problem
    (the LP finds no separating direction), and the status and warning say so; with a
    larger theta_max the fit is exactly the rescaled fit."""
    X, Z = _overlapping(14, n=200)
    assert not separable_labels(X, Z)
    with pytest.warns(ConvergenceWarning, match="theta_max.*rescale"):
        res = fit_bt(X * 1e-8, Z, lam=0)
    assert not res.converged and res.status == "theta_max"
    assert np.abs(res.theta).max() <= 1e6
    big = fit_bt(X * 1e-8, Z, lam=0, theta_max=1e12)
    ref = fit_bt(X, Z, lam=0)
    assert big.converged
    np.testing.assert_allclose(big.theta * 1e-8, ref.theta, rtol=1e-7)
    np.testing.assert_allclose(big.cov * 1e-16, ref.cov, rtol=1e-6)
