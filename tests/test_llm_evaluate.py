"""Evaluation on generations (llm.evaluate): sampling log-probs, gold win rates and their Monte Carlo error,
KL, expected accuracy, the gradient probe and the closed form of the gradient-variance ratio at pi_ref."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from llm.evaluate import (
    Samples,
    closed_form_from_moments,
    expected_accuracy,
    gradient_probe,
    kl_from_samples,
    pair_gradients_at_ref,
    response_logps,
    sample,
    win_rate,
)
from llm.gold import p_star

pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tests/conftest.py


def _tiny_lm(seed=0, vocab=40):
    from llm.tiny_lm import tiny_gpt2

    return tiny_gpt2(vocab, n_layer=1, n_embd=16, n_head=2, n_positions=64, eos_token_id=0, seed=seed).eval()


def _prompts(n, seed=0, vocab=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=rng.integers(2, 7)).tolist() for _ in range(n)]


# --------------------------------------------------------------------------- sampling


def test_sample_log_probs_equal_the_teacher_forced_forward():
    """Fast path (log-probs accumulated while sampling, KV cache, left padding) vs the trainer's forward."""
    m = _tiny_lm()
    P = _prompts(7)
    S = sample(m, P, 3, max_new_tokens=6, eos_id=0, pad_id=0, seed=11, batch_size=5)
    assert len(S.ids) == 21 and all(1 <= len(r) <= 6 for r in S.ids)
    for r, e in zip(S.ids, S.ended):
        assert (r[-1] == 0) == e and 0 not in r[:-1]  # stops at the first EOS, keeps it
    tf = response_logps(m, [p for p in P for _ in range(3)], [[r] for r in S.ids], pad_id=0)[:, 0]
    np.testing.assert_allclose(S.logp, tf, atol=2e-4)
    again = sample(m, P, 3, max_new_tokens=6, eos_id=0, pad_id=0, seed=11, batch_size=5)
    assert again.ids == S.ids
    other = sample(m, P, 3, max_new_tokens=6, eos_id=0, pad_id=0, seed=12, batch_size=5)
    assert other.ids != S.ids
    back = Samples.from_arrays(S.to_arrays())
    assert back.ids == S.ids and np.array_equal(back.logp, S.logp)


def test_kl_of_a_policy_with_itself_is_zero_and_positive_otherwise():
    import copy

    m = _tiny_lm(0)
    other = copy.deepcopy(m)
    with torch.no_grad():
        other.transformer.wte.weight.mul_(6.0)  # tied output layer: a much sharper next-token distribution
    P = _prompts(30, seed=2)
    S = sample(m, P, 4, 6, 0, 0, seed=3)
    lref = response_logps(m, [p for p in P for _ in range(4)], [[r] for r in S.ids], 0)[:, 0]
    kl0 = kl_from_samples(S.logp.reshape(30, 4), lref.reshape(30, 4))
    assert abs(kl0["mean"]) < 1e-4
    lo = response_logps(other, [p for p in P for _ in range(4)], [[r] for r in S.ids], 0)[:, 0]
    kl = kl_from_samples(S.logp.reshape(30, 4), lo.reshape(30, 4))
    assert kl["mean"] > 3 * kl["se"] > 0
    with pytest.raises(ValueError, match="non-finite"):
        kl_from_samples(np.array([[0.0, np.nan]]), np.zeros((1, 2)))


# --------------------------------------------------------------------------- gold metrics


def test_win_rate_mean_and_clustered_se():
    P = np.array([[0.2, 0.4], [0.6, 0.8], [0.5, 0.5]])
    w = win_rate(P)
    per = np.array([0.3, 0.7, 0.5])
    assert w["mean"] == pytest.approx(0.5) and w["n_prompts"] == 3
    assert w["se"] == pytest.approx(per.std(ddof=1) / math.sqrt(3))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        win_rate(np.array([[0.2], [1.3]]))
    with pytest.raises(ValueError, match=">= 2 prompts"):
        win_rate(np.array([[0.5]]))


def test_pi_ref_against_itself_wins_half_within_its_monte_carlo_error():
    """Two independent sample sets of one policy under a mixture gold: the win rate is 1/2 within 3 SE."""
    m = _tiny_lm(3)
    P = _prompts(200, seed=4)
    rng = np.random.default_rng(5)
    thA, thB = rng.normal(size=40), rng.normal(size=40)

    def rewards(S):  # heads on bag-of-tokens features
        F = np.zeros((len(S.ids), 40))
        for i, r in enumerate(S.ids):
            np.add.at(F[i], r, 1.0)
        return np.stack([F @ thA, F @ thB], -1)

    A = rewards(sample(m, P, 2, 8, 0, 0, seed=6)).reshape(200, 2, 2)
    B = rewards(sample(m, P, 3, 8, 0, 0, seed=7)).reshape(200, 3, 2)
    p = p_star(A[:, :, None, 0], A[:, :, None, 1], B[:, None, :, 0], B[:, None, :, 1], 0.5)
    w = win_rate(p)
    assert 0 < w["se"] < 0.05
    assert abs(w["mean"] - 0.5) < 3 * w["se"], w


def test_expected_accuracy():
    delta = np.array([1.0, -2.0, 0.0, 3.0])
    p = np.array([0.9, 0.3, 0.6, 0.2])
    a = expected_accuracy(delta, p)
    assert a["mean"] == pytest.approx(np.mean([0.9, 0.7, 0.5, 0.2]))
    assert a["bayes"] == pytest.approx(np.mean([0.9, 0.7, 0.6, 0.8]))


# --------------------------------------------------------------------------- the closed form at pi_ref


def _population(seed, n_x=4, n_pairs=3, d=5):
    """A finite population: per prompt, pairs (uniform) with gradient X, gold p*, auxiliary g."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_x, n_pairs, d)) + rng.normal(size=(n_x, 1, d))  # prompt effects: Var_x(E[.|x]) > 0
    ps = rng.uniform(0.02, 0.98, size=(n_x, n_pairs))
    g = np.clip(ps + rng.normal(scale=0.2, size=ps.shape), 0.01, 0.99)
    return X, ps, g


def _brute_force_traces(X, ps, g, M, lam):
    """tr Cov of psi_DPO and psi_VRPO at pi_ref by enumerating (x, labelled pair, Z, M extra pairs)."""
    n_x, n_p, d = X.shape
    vals_d, vals_v, wts = [], [], []
    for x in range(n_x):
        for j in range(n_p):
            for Z in (0, 1):
                pz = ps[x, j] if Z else 1 - ps[x, j]
                psi_d = -(Z - 0.5) * X[x, j]
                for extra in itertools.product(range(n_p), repeat=M):
                    w = pz / (n_x * n_p * n_p ** M)
                    corr = (g[x, j] - 0.5) * X[x, j] - np.mean([(g[x, m] - 0.5) * X[x, m] for m in extra], axis=0)
                    vals_d.append(psi_d)
                    vals_v.append(psi_d + lam * corr)
                    wts.append(w)
    w = np.array(wts)

    def trcov(v):
        v = np.array(v)
        mu = w @ v
        return float(w @ np.sum((v - mu) ** 2, axis=1))

    return trcov(vals_d), trcov(vals_v)


def _exact_moments(X, ps, g, P=2):
    """Per-prompt sums that make closed_form_from_moments read the exact population moments."""
    n_x = X.shape[0]
    a, b = (ps - 0.5)[..., None] * X, (g - 0.5)[..., None] * X  # (n_x, pairs, d)
    xx = np.sum(X * X, -1)
    abar, bbar = a.mean(1), b.mean(1)  # E[a | x], E[b | x] under a uniform pair
    return {"n_prompts": n_x, "pairs_per_prompt": P,
            "xx": P * xx.mean(1), "ab_xx": P * ((ps - 0.5) * (g - 0.5) * xx).mean(1),
            "bb": P * ((g - 0.5) ** 2 * xx).mean(1), "bb_cross": P * (P - 1) * np.sum(bbar * bbar, -1),
            "ab_cross": P * (P - 1) * np.sum(abar * bbar, -1), "sum_a": torch.as_tensor(P * abar.sum(0))}


@pytest.mark.parametrize("M,lam", [(1, 1.0), (2, 1.0), (3, 0.6), (2, 0.0)])
@pytest.mark.parametrize("oracle", [True, False])
def test_closed_form_equals_brute_force_enumeration(M, lam, oracle):
    """The gradient-variance formula at pi_ref (any g, any lam) against an exact enumeration."""
    X, ps, g = _population(seed=M + int(10 * lam))
    if oracle:
        g = ps
    td, tv = _brute_force_traces(X, ps, g, M, lam)
    cf = closed_form_from_moments(_exact_moments(X, ps, g), M, lam)
    assert cf["trace_dpo_per_example"] == pytest.approx(td, rel=1e-10)
    assert cf["trace_vrpo_per_example"] == pytest.approx(tv, rel=1e-10)
    assert cf["ratio"] == pytest.approx(tv / td, rel=1e-10)
    if oracle and lam == 1.0:
        m = cf["moments"]  # 1 - (1 - 1/M) E_x tr Cov((p*-1/2) X | x) / tr Cov psi_DPO
        assert cf["ratio"] == pytest.approx(1 - (1 - 1 / M) * (m["S_b"] - m["B_b"]) / td, rel=1e-10)
        assert cf["lam_opt"] == pytest.approx(M / (M + 1), rel=1e-10)
    # the best lam minimises the enumerated trace too
    lo = _brute_force_traces(X, ps, g, M, cf["lam_opt"])[1]
    for other in (max(0.0, cf["lam_opt"] - 0.1), min(1.0, cf["lam_opt"] + 0.1)):
        assert lo <= _brute_force_traces(X, ps, g, M, other)[1] + 1e-12


def test_pair_gradient_moments_equal_explicit_gradients():
    """pair_gradients_at_ref's per-prompt sums against gradients stacked one by one."""
    m = _tiny_lm(4)
    P = _prompts(5, seed=8)
    S = sample(m, P, 6, 4, 0, 0, seed=9)
    resp = [S.ids[6 * i:6 * i + 6] for i in range(5)]  # 3 pairs per prompt
    rng = np.random.default_rng(10)
    ps, g = rng.uniform(0.05, 0.95, (5, 3)), rng.uniform(0.05, 0.95, (5, 3))
    beta = 0.3
    mom = pair_gradients_at_ref(m, P, resp, beta, 0, {"x": (ps, g)})["x"]
    from llm.evaluate import _seq_logps

    params = [p for p in m.parameters() if p.requires_grad]
    for i in range(5):
        Xs = []
        for j in range(3):
            lps = _seq_logps(m, [P[i]], [[resp[i][2 * j], resp[i][2 * j + 1]]], 0, "cpu")[0]
            gr = torch.autograd.grad(beta * (lps[0] - lps[1]), params)
            Xs.append(torch.cat([t.reshape(-1) for t in gr]).double().numpy())
        Xs = np.array(Xs)
        a, b = (ps[i] - 0.5)[:, None] * Xs, (g[i] - 0.5)[:, None] * Xs
        assert mom["xx"][i] == pytest.approx(np.sum(Xs * Xs), rel=1e-6)
        assert mom["bb"][i] == pytest.approx(np.sum(b * b), rel=1e-6)
        off = ~np.eye(3, dtype=bool)
        assert mom["bb_cross"][i] == pytest.approx(np.sum((b @ b.T)[off]), rel=1e-5, abs=1e-9)
        assert mom["ab_cross"][i] == pytest.approx(np.sum((a @ b.T)[off]), rel=1e-5, abs=1e-9)


def test_gradient_probe_matches_exact_minibatch_covariance():
    """Monte Carlo probe vs the exact covariance of minibatch means (B of n without replacement)."""
    m = _tiny_lm(5)
    n, B, K = 10, 3, 4  # one extra pair
    P = _prompts(n, seed=11)
    S = sample(m, P, K, 4, 0, 0, seed=12)
    resp = [S.ids[K * i:K * i + K] for i in range(n)]
    ref = response_logps(m, P, resp, 0) - 0.05 * np.arange(K)[None]  # a policy slightly off pi_ref
    rng = np.random.default_rng(13)
    Z, g, g_aux = np.ones(n), rng.uniform(0.1, 0.9, n), rng.uniform(0.1, 0.9, (n, 1))
    beta, lam = 0.5, 1.0
    from llm.evaluate import _seq_logps
    from vrpo.loss import vr_objective

    params = [p for p in m.parameters() if p.requires_grad]
    psi = {"d": [], "v": []}
    for i in range(n):
        lp = _seq_logps(m, [P[i]], [resp[i]], 0, "cpu") - torch.as_tensor(ref[i:i + 1], dtype=torch.float32)
        mg = beta * (lp[:, 0::2] - lp[:, 1::2])
        Zt, gt, gat = torch.tensor([1.0]), torch.tensor([float(g[i])]), torch.tensor([[float(g_aux[i, 0])]])
        for k, L in (("d", vr_objective(mg[:, 0], Zt, lam=0.0)),
                     ("v", vr_objective(mg[:, 0], Zt, gt, mg[:, 1:], gat, lam=lam))):
            gr = torch.autograd.grad(L, params, retain_graph=True)
            psi[k].append(torch.cat([t.reshape(-1) for t in gr]).double().numpy())
    exact = {}
    for k, v in psi.items():
        v = np.array(v)
        per = np.sum((v - v.mean(0)) ** 2) / (n - 1)  # finite-population covariance of one example
        exact[k] = per / B * (n - B) / n  # of a mean of B distinct examples
    pr = gradient_probe(m, P, resp, ref, Z, g, g_aux, beta, lam, 0, batch_size=B, n_pairs=150, seed=14)
    assert abs(pr["trace_dpo"] - exact["d"]) < 4 * pr["trace_dpo_se"]
    assert abs(pr["trace_vrpo"] - exact["v"]) < 4 * pr["trace_vrpo_se"]
    assert pr["ratio_lo"] <= pr["ratio"] <= pr["ratio_hi"]
    assert abs(pr["ratio"] - exact["v"] / exact["d"]) < 4 * pr["ratio_se"]
    with pytest.raises(ValueError, match="exceeds"):
        gradient_probe(m, P, resp, ref, Z, g, g_aux, beta, lam, 0, batch_size=n + 1, n_pairs=2, seed=0)


def test_fixed_assignment_ratio_is_what_the_probe_estimates():
    """At pi_ref: the exact ratio on the examples as they are (pair 0 labelled, pairs 1..M extra, Z integrated)
    equals a brute-force per-example computation, and the Monte Carlo probe (labels redrawn, draws with
    replacement) estimates it within 4 of its standard errors."""
    from llm.evaluate import _seq_logps, fixed_assignment_ratio
    from vrpo.loss import vr_objective

    m = _tiny_lm(6)
    n, M, beta = 12, 2, 0.4
    K = 2 + 2 * M
    P = _prompts(n, seed=15)
    S = sample(m, P, K, 4, 0, 0, seed=16)
    resp = [S.ids[K * i:K * i + K] for i in range(n)]
    rng = np.random.default_rng(17)
    ps, g = rng.uniform(0.05, 0.95, (n, 1 + M)), rng.uniform(0.05, 0.95, (n, 1 + M))
    mom = pair_gradients_at_ref(m, P, resp, beta, 0, {"x": (ps, g)}, Ms=(1, M))["x"]
    ref = response_logps(m, P, resp, 0)
    params = [p for p in m.parameters() if p.requires_grad]
    for MM in (1, M):
        psi = {"d": [], "v": []}  # per (example, Z) with weight p(Z) / n
        w = []
        for i in range(n):
            lp = _seq_logps(m, [P[i]], [resp[i][:2 + 2 * MM]], 0, "cpu") - torch.as_tensor(
                ref[i:i + 1, :2 + 2 * MM], dtype=torch.float32)
            mg = beta * (lp[:, 0::2] - lp[:, 1::2])
            for Z in (0.0, 1.0):
                Zt = torch.tensor([Z])
                Ld = vr_objective(mg[:, 0], Zt, lam=0.0)
                Lv = vr_objective(mg[:, 0], Zt, torch.tensor([float(g[i, 0])]), mg[:, 1:],
                                  torch.tensor([g[i, 1:1 + MM].tolist()], dtype=torch.float32), lam=1.0)
                for k, L in (("d", Ld), ("v", Lv)):
                    gr = torch.autograd.grad(L, params, retain_graph=True)
                    psi[k].append(torch.cat([t.reshape(-1) for t in gr]).double().numpy())
                w.append((ps[i, 0] if Z else 1 - ps[i, 0]) / n)
        w = np.array(w)
        tr = {}
        for k, v in psi.items():
            v = np.array(v)
            mu = w @ v
            tr[k] = float(w @ np.sum((v - mu) ** 2, axis=1))
        ex = fixed_assignment_ratio(mom, MM, 1.0)
        assert ex["trace_dpo_per_example"] == pytest.approx(tr["d"], rel=1e-4)
        assert ex["trace_vrpo_per_example"] == pytest.approx(tr["v"], rel=1e-4)
        pr = gradient_probe(m, P, [r[:2 + 2 * MM] for r in resp], ref[:, :2 + 2 * MM], np.ones(n), g[:, 0],
                            g[:, 1:1 + MM], beta, 1.0, 0, batch_size=4, n_pairs=150, seed=18, p_label=ps[:, 0],
                            replace=True)
        assert abs(pr["ratio"] - ex["ratio"]) < 4 * pr["ratio_se"], (pr["ratio"], ex["ratio"], pr["ratio_se"])
