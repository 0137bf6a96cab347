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


# ----------------------------------------------------------------- the fast path and its fallback

import vrpo.solver as solver_mod  # noqa: E402


def _blocks(X, Z, g, Xa, ga, lam):
    """The objective of fit_bt as solver Blocks (fresh-prompt rows), for ``lam (R,)``."""
    Xa_r, ga_r = _rows(Xa, ga)
    return fit_mod._objective_blocks(X, Z, g, Xa_r, ga_r, lam)


def _hard_problems():
    """(name, data, lam) cases: easy, lam close to 1, near-separable, collinear, far start."""
    X, Z, g, Xa, ga = _problem(20, R=6, n=200, N=600, d=4)
    yield "easy", (X, Z, g, Xa, ga), np.array([0.0, 0.3, 0.7, 1.0, 1.0, 0.5])
    yield "lam near 1", (X, Z, g, Xa, ga), np.array([0.99, 0.999, 0.9999, 1.0, 0.995, 0.98])
    Xs, Zs, gs, Xas, gas = _problem(21, R=8, n=40, N=80, d=3, sharp=8.0)
    yield "near-separable", (Xs, Zs, gs, Xas, gas), np.linspace(0.0, 1.0, 8)
    Xc, Zc, gc, Xac, gac = _problem(22, R=4, n=300, N=600, d=3)
    Xc[..., 2] = Xc[..., 0] + 1e-4 * np.random.default_rng(0).normal(size=Xc.shape[:-1])
    Xac[..., 2] = Xac[..., 0] + 1e-4 * np.random.default_rng(1).normal(size=Xac.shape[:-1])
    yield "nearly collinear", (Xc, Zc, gc, Xac, gac), np.array([0.0, 0.5, 1.0, 1.0])


@pytest.mark.parametrize("case", list(_hard_problems()), ids=lambda c: c[0])
def test_minimise_fast_agrees_with_minimise_and_plain_newton(case):
    """The fast loop (plus its fallback) and the safeguarded solver stop at the same
    minimiser wherever one is certified; the damped plain Newton agrees on the margins."""
    name, (X, Z, g, Xa, ga), lam = case
    B = _blocks(X, Z, g, Xa, ga, lam)
    start = np.zeros(B.shape)
    ref, stop_ref, _ = solver_mod.minimise(B, start, 0.0, 1e-10, 100, 1e6)
    fast, stop, _, chord = solver_mod.minimise_fast(B, start, 0.0, 1e-10, 100, 1e6)
    res = _quiet(X, Z, g, Xa, ga, lam=lam)
    ok = res.converged
    assert ok.any()
    np.testing.assert_array_equal(stop[ok], stop_ref[ok])
    scale = 1.0 + np.abs(ref[ok]).max()
    tol = 1e-4 if name == "nearly collinear" else TOL  # condition number ~1e8: theta to the conditioning
    np.testing.assert_allclose(fast[ok], ref[ok], atol=tol * scale)
    np.testing.assert_allclose(res.theta[ok], ref[ok], atol=tol * scale)
    Xa_r, ga_r = _rows(Xa, ga)
    for r in np.flatnonzero(ok):
        plain, _ = plain_newton(X[r:r + 1], Z[r:r + 1], g[r:r + 1], Xa_r[r:r + 1], ga_r[r:r + 1], lam=float(lam[r]),
                                damped=True, max_iter=400)
        np.testing.assert_allclose(X[r] @ res.theta[r], X[r] @ plain[0], atol=1e-7 * scale)
    # where the fast loop gave up, the fallback is minimise itself, bit for bit
    np.testing.assert_array_equal(fast[~chord], ref[~chord])
    if name == "near-separable":
        assert (~chord).any() and np.isin(res.status[~ok], ["separable", "unbounded"]).all()


def test_fast_path_hands_difficult_starts_to_minimise():
    """From 3x the solution the full Newton step fails the gradient test: the replication
    goes to minimise (from theta0) and the result is minimise's exactly."""
    X, Z, g, Xa, ga = _problem(23, R=3)
    lam = np.ones(3)
    B = _blocks(X, Z, g, Xa, ga, lam)
    near, _, _ = solver_mod.minimise(B, np.zeros(B.shape), 0.0, 1e-10, 100, 1e6)
    start = 3.0 * near
    fast, stop, it, chord = solver_mod.minimise_fast(B, start, 0.0, 1e-10, 100, 1e6)
    ref, stop_ref, it_ref = solver_mod.minimise(B, start, 0.0, 1e-10, 100, 1e6)
    assert not chord.any()
    np.testing.assert_array_equal(fast, ref)
    np.testing.assert_array_equal(it, it_ref)
    np.testing.assert_allclose(fast, near, atol=1e-8)


def test_a_chord_stop_that_fails_the_newton_check_is_solved_again(monkeypatch):
    """If the Newton step at a chord-stopped result is not small, fit_bt re-solves those
    replications with minimise and recomputes their sandwich: forcing the check to fail
    everywhere gives the same estimates and covariances."""
    X, Z, g, Xa, ga = _problem(24, R=4, M=2)
    base = {lam: fit_bt(X, Z, g, Xa, ga, lam=lam) for lam in (0.0, 0.6, 1.0, "auto")}
    calls = {"n": 0}
    orig = solver_mod.minimise

    def counting(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    monkeypatch.setattr(fit_mod, "newton_step_small", lambda grad, H, theta, tol: np.zeros(len(theta), dtype=bool))
    monkeypatch.setattr(fit_mod, "minimise", counting)
    for lam, b in base.items():
        calls["n"] = 0
        res = fit_bt(X, Z, g, Xa, ga, lam=lam)
        assert calls["n"] >= 1 and res.converged.all()
        np.testing.assert_allclose(res.theta, b.theta, atol=1e-9)
        np.testing.assert_allclose(res.cov, b.cov, rtol=1e-7, atol=1e-15)


def test_newton_check_accepts_fast_results_and_rejects_far_points():
    X, Z, g, Xa, ga = _problem(25, R=3)
    res = fit_bt(X, Z, g, Xa, ga, lam=1.0)
    B = _blocks(X, Z, g, Xa, ga, np.ones(3))
    _, grad, H = solver_mod.evaluate(B, res.theta, 0.0)
    assert solver_mod.newton_step_small(grad, H, res.theta, 1e-10).all()
    _, grad, H = solver_mod.evaluate(B, res.theta + 1e-6, 0.0)
    assert not solver_mod.newton_step_small(grad, H, res.theta + 1e-6, 1e-10).any()


def test_first_hessian_at_zero_is_the_gram_matrix_and_per_replication_paths_agree():
    """At theta = 0 every sigmoid is 1/2: the fast loop's Gram Hessian equals the general
    one; the batched and one-replication-at-a-time branches give the same numbers."""
    X, Z, g, Xa, ga = _problem(26, R=5)
    for lam in (np.full(5, 1.0), np.array([0.0, 0.2, 0.5, 0.9, 1.0])):
        B = _blocks(X, Z, g, Xa, ga, lam)
        ks = B.active()
        XT, C = [B.XT[k] for k in ks], [B.c[k] for k in ks]
        S = [np.full((5, x.shape[2]), 0.5) for x in XT]
        buf = [np.empty_like(x) for x in XT]
        _, _, H_ref = solver_mod.evaluate(B, np.zeros(B.shape), 0.3)
        for at_zero in (np.ones(5, bool), np.zeros(5, bool)):
            H_all = solver_mod._fast_hessian(XT, C, S, 0.3, None, at_zero, buf)
            H_one = solver_mod._fast_hessian(XT, C, S, 0.3, np.arange(5), at_zero, buf)
            np.testing.assert_allclose(H_all, H_ref, rtol=1e-13, atol=1e-15)
            np.testing.assert_allclose(H_one, H_all, rtol=1e-14, atol=1e-16)
