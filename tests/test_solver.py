"""The fast solver (chunked, chord steps, Armijo only as a safeguard) against a plain Newton.

``sim.bench.plain_newton(damped=True)`` is the textbook reference: a full float64
Hessian and a least-squares solve every iteration, Armijo backtracking on the
objective, all replications at once, no reuse of anything. On random problems,
including hard ones (nearly separable labels, lam close to 1, collinear or nearly
collinear columns), both must reach the same minimiser.
"""

import warnings

import numpy as np
import pytest
from scipy.special import expit

import vrpo.fit as fit_mod
from sim.bench import plain_newton
from vrpo import ConvergenceWarning, fit_bt

TOL = 1e-7  # both stop at a step of 1e-10 (1 + |theta|); the minimiser agrees far below this


def _problem(seed, R=4, n=300, N=900, d=4, sharp=1.0, M=None):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    X = rng.normal(size=(R, n, d))
    p = expit(sharp * (X @ w) + 0.5 * np.sin(2 * X[..., 0]))
    Z = (rng.random(p.shape) < p).astype(float)
    g = np.clip(p + 0.2 * rng.normal(size=p.shape), 0.0, 1.0)
    Xa = rng.normal(size=(R, n, M, d) if M else (R, N, d))
    pa = expit(sharp * (Xa @ w))
    ga = np.clip(pa + 0.2 * rng.normal(size=pa.shape), 0.0, 1.0)
    return X, Z, g, Xa, ga


def _quiet(*a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return fit_bt(*a, **k)


def _rows(Xa, ga):
    R, d = Xa.shape[0], Xa.shape[-1]
    return Xa.reshape(R, -1, d), ga.reshape(R, -1)


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("mode", ["fresh", "same"])
def test_fast_path_equals_plain_newton_on_random_problems(lam, mode):
    for seed in range(3):
        X, Z, g, Xa, ga = _problem(seed, M=3 if mode == "same" else None)
        res = fit_bt(X, Z, g, Xa, ga, lam=lam)
        ref, _ = plain_newton(X, Z, g, *_rows(Xa, ga), lam=lam, damped=True)
        assert res.converged.all()
        np.testing.assert_allclose(res.theta, ref, atol=TOL * (1 + np.abs(ref).max()))


def test_nearly_separable_samples_agree_where_a_minimiser_exists():
    """Sharp labels (logit slope 8) and small n: large but finite MLEs next to separated
    samples. Where fit_bt certifies a minimiser, the damped plain Newton reaches it too."""
    X, Z, g, Xa, ga = _problem(10, R=24, n=40, d=3, sharp=8.0)
    res = _quiet(X, Z, lam=0)
    assert 4 <= res.converged.sum() < 24  # both kinds are present
    ref, _ = plain_newton(X, Z, g, Xa, ga, lam=0.0, damped=True, max_iter=400, tol=1e-13)
    ok = res.converged
    scale = 1 + np.abs(res.theta[ok]).max(axis=1, keepdims=True)
    np.testing.assert_allclose(res.theta[ok], ref[ok], atol=1e-6 * scale.max())
    assert (res.status[~ok] == "separable").all()


def test_collinear_columns_give_the_same_fitted_margins():
    """Exactly collinear columns: theta is not identified (fit_bt flags rank_deficient);
    the fitted margins X theta are, and both solvers find the same ones."""
    X, Z, g, Xa, ga = _problem(11, R=3, n=300, N=600, d=3)
    X[..., 2] = X[..., 0] - X[..., 1]
    Xa[..., 2] = Xa[..., 0] - Xa[..., 1]
    for lam in (0.0, 0.5, 1.0):
        res = _quiet(X, Z, g, Xa, ga, lam=lam)
        assert (res.status == "rank_deficient").all()
        ref, _ = plain_newton(X, Z, g, Xa, ga, lam=lam, damped=True)
        np.testing.assert_allclose(np.einsum("rnd,rd->rn", X, res.theta), np.einsum("rnd,rd->rn", X, ref), atol=1e-6)
        np.testing.assert_allclose(np.einsum("rnd,rd->rn", Xa, res.theta), np.einsum("rnd,rd->rn", Xa, ref), atol=1e-6)


def test_nearly_collinear_columns_agree():
    """Correlation 1 - 1e-8 between two columns: identified but ill-conditioned (condition
    number ~1e8); the estimates agree to the conditioning, the margins to 1e-8."""
    X, Z, g, Xa, ga = _problem(12, R=3, n=400, N=800, d=3)
    rng = np.random.default_rng(0)
    X[..., 2] = X[..., 0] + 1e-4 * rng.normal(size=X.shape[:-1])
    Xa[..., 2] = Xa[..., 0] + 1e-4 * rng.normal(size=Xa.shape[:-1])
    for lam in (0.0, 1.0):
        res = fit_bt(X, Z, g, Xa, ga, lam=lam)
        assert res.converged.all()
        ref, _ = plain_newton(X, Z, g, Xa, ga, lam=lam, damped=True)
        np.testing.assert_allclose(res.theta, ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.einsum("rnd,rd->rn", X, res.theta), np.einsum("rnd,rd->rn", X, ref), atol=1e-8)


def test_results_do_not_depend_on_the_chunk_size(monkeypatch):
    """Chunks are a cache optimisation only: every decision of the solver is per replication."""
    X, Z, g, Xa, ga = _problem(13, R=7, n=200, N=400, d=3, sharp=3.0)
    ref = {lam: _quiet(X, Z, g, Xa, ga, lam=lam) for lam in (0.0, 1.0, "auto")}
    for chunk in (1, 8 * 3 * 600 * 3):  # one replication, three replications per chunk
        monkeypatch.setattr(fit_mod, "_CHUNK_BYTES", chunk)
        for lam, r in ref.items():
            res = _quiet(X, Z, g, Xa, ga, lam=lam)
            np.testing.assert_array_equal(res.status, r.status)
            np.testing.assert_allclose(res.theta, r.theta, rtol=0, atol=1e-12)
            np.testing.assert_allclose(res.cov, r.cov, rtol=1e-10, atol=0)


def test_full_step_without_objective_and_armijo_safeguard(monkeypatch):
    """The objective is evaluated only when a full step fails to reduce the gradient norm
    (and once to compare a given theta0 with 0): on a well-posed problem from 0 never;
    from 3x the solution the Armijo safeguard engages; from a far, saturated start the
    fit restarts at 0. Every path reaches the same minimiser."""
    import vrpo.solver as solver

    calls = {"n": 0}
    orig = solver.objective

    def counting(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    monkeypatch.setattr(solver, "objective", counting)
    X, Z, g, Xa, ga = _problem(14, R=3)
    for lam in (0.0, 1.0):
        calls["n"] = 0
        near = fit_bt(X, Z, g, Xa, ga, lam=lam)
        assert calls["n"] == 0
        far = fit_bt(X, Z, g, Xa, ga, lam=lam, theta0=3.0 * near.theta)
        assert calls["n"] > 1 and far.converged.all()
        np.testing.assert_allclose(far.theta, near.theta, atol=1e-8)
        for start in (30.0, -100.0):
            very_far = fit_bt(X, Z, g, Xa, ga, lam=lam, theta0=np.full(4, start))
            assert very_far.converged.all()
            np.testing.assert_allclose(very_far.theta, near.theta, atol=1e-8)
