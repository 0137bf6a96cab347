"""The pairwise loss and the VR objective: exact identities, NumPy vs torch."""

import numpy as np
import pytest

from vrpo import LOSSES, logistic_loss, pairwise_loss, vr_objective

RTOL = 1e-12  # float64 identities


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_expected_loss_is_loss_at_g(kind):
    """E_{Z~Bern(g)} l(delta, Z) = l(delta, g): every loss is linear in the soft label."""
    rng = np.random.default_rng(0)
    delta, g = rng.normal(size=50) * 3, rng.random(50)
    expected = g * pairwise_loss(delta, 1.0, kind) + (1 - g) * pairwise_loss(delta, 0.0, kind)
    np.testing.assert_allclose(expected, pairwise_loss(delta, g, kind), rtol=RTOL)


def test_logistic_loss_values_and_stability():
    # l(0, q) = log 2 for every q; l(delta, 1) = log(1 + e^-delta)
    np.testing.assert_allclose(logistic_loss(0.0, np.array([0.0, 0.3, 1.0])), np.log(2.0), rtol=RTOL)
    d = np.array([-3.0, 0.5, 2.0])
    np.testing.assert_allclose(logistic_loss(d, 1.0), np.log1p(np.exp(-d)), rtol=RTOL)
    # no overflow far in the tails: l(1000, 1) ~ e^-1000, l(-1000, 1) = 1000
    assert logistic_loss(1000.0, 1.0) == pytest.approx(0.0, abs=1e-300)
    assert logistic_loss(-1000.0, 1.0) == pytest.approx(1000.0, rel=RTOL)
    # logistic identity used by the solver: l(delta, q) = softplus(delta) - q delta
    q = np.array([0.1, 0.5, 0.9])
    np.testing.assert_allclose(logistic_loss(d, q), np.logaddexp(0, d) - q * d, rtol=RTOL)


def test_unknown_loss_is_named():
    with pytest.raises(ValueError, match="unknown pairwise loss 'squared'"):
        pairwise_loss(0.0, 0.5, "squared")


def test_vr_objective_lam0_is_plain_loss():
    rng = np.random.default_rng(1)
    delta, Z = rng.normal(size=20), (rng.random(20) < 0.5).astype(float)
    assert vr_objective(delta, Z, lam=0) == pytest.approx(np.mean(logistic_loss(delta, Z)), rel=RTOL)
    # g and extra pairs are ignored at lam = 0
    assert vr_objective(delta, Z, rng.random(20), rng.normal(size=(20, 3)), rng.random((20, 3)), lam=0) == \
        pytest.approx(np.mean(logistic_loss(delta, Z)), rel=RTOL)


def test_vr_objective_formula_and_missing_inputs():
    rng = np.random.default_rng(2)
    n, M = 30, 4
    delta, Z, g = rng.normal(size=n), rng.random(n), rng.random(n)
    da, ga = rng.normal(size=(n, M)), rng.random((n, M))
    lam = 0.7
    want = (np.mean(logistic_loss(delta, Z) - lam * logistic_loss(delta, g))
            + lam * np.sum(logistic_loss(da, ga)) / (n * M))
    assert vr_objective(delta, Z, g, da, ga, lam) == pytest.approx(want, rel=RTOL)
    with pytest.raises(ValueError, match="needs g, delta_aux and g_aux"):
        vr_objective(delta, Z, lam=1.0)


def test_vr_objective_expectation_equals_mle_objective_exactly():
    """E[L_VR(theta)] = E[l(delta, Z)] for ANY g and lam: exact over a discrete population.

    Population: 6 pair types with probabilities w, true p*, arbitrary (wrong) g. The
    labelled pair and each extra pair are drawn from w; Z ~ Bern(p*). Then
    E[l(delta, Z) - lam l(delta, g)] + lam E[l(delta_aux, g_aux)] = sum_k w_k l(delta_k, p*_k).
    """
    rng = np.random.default_rng(3)
    w = rng.dirichlet(np.ones(6))
    delta, p, g = rng.normal(size=6) * 2, rng.random(6), rng.random(6)
    for lam in (0.0, 0.5, 1.0, 1.7):
        e_lab = np.sum(w * (p * logistic_loss(delta, 1.0) + (1 - p) * logistic_loss(delta, 0.0)
                            - lam * logistic_loss(delta, g)))
        e_aux = lam * np.sum(w * logistic_loss(delta, g))
        assert e_lab + e_aux == pytest.approx(np.sum(w * logistic_loss(delta, p)), rel=RTOL)


def test_vr_objective_monte_carlo_mean_matches_mle_objective():
    """Seeded MC: the sample mean of L_VR over replications matches E[l(delta, p*)] within 4 SE."""
    rng = np.random.default_rng(4)
    w = rng.dirichlet(np.ones(5))
    delta, p, g = rng.normal(size=5) * 2, rng.random(5), rng.random(5)
    R, n, M = 4000, 20, 3
    k = rng.choice(5, size=(R, n), p=w)
    ka = rng.choice(5, size=(R, n, M), p=w)
    Z = (rng.random((R, n)) < p[k]).astype(float)
    vals = np.array([vr_objective(delta[k[r]], Z[r], g[k[r]], delta[ka[r]], g[ka[r]], 1.0) for r in range(R)])
    target = np.sum(w * logistic_loss(delta, p))
    se = vals.std(ddof=1) / np.sqrt(R)
    assert abs(vals.mean() - target) < 4 * se


def test_numpy_and_torch_give_the_same_loss():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    delta, q = rng.normal(size=100) * 5, rng.random(100)
    for kind in LOSSES:
        a = pairwise_loss(delta, q, kind)
        b = pairwise_loss(torch.tensor(delta, dtype=torch.float64), torch.tensor(q, dtype=torch.float64), kind)
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-12, atol=1e-12)
    n, M = 10, 2
    args = (rng.normal(size=n), rng.random(n), rng.random(n), rng.normal(size=(n, M)), rng.random((n, M)))
    a = vr_objective(*args, lam=0.8)
    b = vr_objective(*(torch.tensor(x) for x in args), lam=0.8)
    assert float(b) == pytest.approx(float(a), rel=1e-12)


def test_vr_objective_lam_zero_as_array_or_tensor():
    rng = np.random.default_rng(6)
    delta, Z = rng.normal(size=8), rng.random(8)
    want = np.mean(logistic_loss(delta, Z))
    assert vr_objective(delta, Z, lam=np.array(0.0)) == pytest.approx(want, rel=RTOL)
    torch = pytest.importorskip("torch")
    got = vr_objective(torch.tensor(delta), torch.tensor(Z), lam=torch.tensor(0.0))
    assert float(got) == pytest.approx(want, rel=RTOL)
