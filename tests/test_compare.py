"""Theory vs simulation (analysis.compare): a seeded Monte Carlo check and the table's arithmetic."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.compare import Z_FLAG, agreement_summary, compare_table, sweep_theories
from vrpo_common.stats import paired_ratio
from sim.config import ExperimentConfig
from sim.runner import populations, result_metadata, run_experiment


@pytest.fixture(scope="module")
def misspecified_sweep(tmp_path_factory):
    """mixture:1 (misspecified), n = 1000, 300 replications, seed 0; oracle and noisy g."""
    out = tmp_path_factory.mktemp("cmp")
    cfg = ExperimentConfig(name="test-compare", scenarios=("mixture:1.0",), n=(1000,), g=("oracle", "noisy:1.0"),
                           methods=("mle", "vr", "vr-auto"), reps=300, seed=0, n_pop=5000, n_eval=300,
                           chunk_size=100, progress=False, output=str(out / "c.parquet"))
    df = run_experiment(cfg, write=False)
    meta = result_metadata(cfg, populations(cfg))
    theories, G_eval = sweep_theories(cfg, meta, n_ctx=4000, n_batches=10, cache_dir=out / "theory")
    return cfg, df, compare_table(df, cfg, theories, G_eval)


def test_simulated_n_cov_matches_V_within_mc_error(misspecified_sweep):
    """n tr Cov(theta_hat) against tr V for MLE, VR and VR-auto: within Z_FLAG combined SEs (seeded).

    The SE is the Monte Carlo SE of n tr Cov over 300 replications (about 6%) plus the
    theory's jackknife SE; a wrong V (e.g. a missing 1/M or between-prompt term, about
    10-15% here) fails it.
    """
    _, _, tab = misspecified_sweep
    assert len(tab) == 5
    assert np.all(np.abs(tab["z_cov"]) <= Z_FLAG), tab[["g", "method", "ntrcov_sim", "ntrcov_sim_se", "trV_th"]]
    assert np.all(tab["ntrcov_sim_se"] / tab["ntrcov_sim"] < 0.1)
    # the variance reduction itself is visible and predicted: oracle VR below the MLE
    vr = tab[(tab.g == "oracle") & (tab.method == "vr")].iloc[0]
    assert vr["var_ratio_th"] < 0.9
    assert vr["var_ratio_sim"] + 3 * vr["var_ratio_sim_se"] < 1.0
    assert abs(vr["z_var_ratio"]) <= Z_FLAG


def test_regret_and_coverage_columns(misspecified_sweep):
    _, _, tab = misspecified_sweep
    assert np.all(np.abs(tab["z_regret"]) <= Z_FLAG)
    # coverage of a 95% interval over 300 reps x 4 coordinates: binomial SE about 0.6%
    assert np.all(np.abs(tab["coverage_sim"] - 0.95) < 0.035)
    # vr-auto uses the estimated lam; its mean is close to the population optimum
    auto = tab[tab.method == "vr-auto"]
    assert np.all(np.abs(auto["lam_sim"] - auto["lam_th"]) < 0.1)


def test_paired_ratio_delta_method():
    rng = np.random.default_rng(0)
    den = rng.gamma(2.0, size=400)
    r, se = paired_ratio(2 * den, den)
    assert r == pytest.approx(2.0) and se == pytest.approx(0.0, abs=1e-12)
    # independent samples: delta-method SE against the bootstrap
    num = rng.gamma(2.0, size=400)
    r, se = paired_ratio(num, den)
    boot = [num[i].mean() / den[i].mean() for i in rng.integers(0, 400, size=(2000, 400))]
    assert se == pytest.approx(np.std(boot), rel=0.1)


def test_agreement_summary_counts():
    tab = pd.DataFrame({"n": [500, 1000, 2000, 2000], "z_cov": [5.0, 1.0, -3.5, np.nan], "z_regret": [0, 0, 0, 0]})
    s = agreement_summary(tab, n_min=1000).set_index("check")
    assert s.loc["cov", "cells"] == 2 and s.loc["cov", "within"] == 1
    assert s.loc["regret", "within"] == 3


def test_holm_table_long_form_and_rejections():
    from analysis.compare import holm_table

    tab = pd.DataFrame({"n": [1000, 1000, 2000, 500], "z_cov": [0.5, 6.0, -1.0, 9.0], "p_cov": [0.617, 2e-9, 0.317, 0],
                        "z_regret": [np.nan, 1.0, 0.0, 0.0], "p_regret": [np.nan, 0.317, 1.0, 1.0]})
    long = holm_table(tab, n_min=1000, alpha=1e-3)
    assert len(long) == 5  # 3 cov + 2 regret at n >= 1000 (NaN z dropped)
    assert long["rejected"].sum() == 1 and long.loc[long["rejected"], "z"].iloc[0] == 6.0
    assert long["p_holm"].max() <= 1.0


def test_shared_data_groups_follow_seed_bandit_and_scenario():
    from analysis.compare import shared_data_groups

    a = ExperimentConfig(name="a", scenarios=("mixture:1.0",), n=(1000,), M=4)
    b = a.replace(name="b", M=16, aux_prompts="fresh")  # same labelled data: M and prompts come later in the stream
    c = a.replace(name="c", seed=1)
    d = a.replace(name="d", scale=10.0)
    groups = shared_data_groups({"a": a, "b": b, "c": c, "d": d})
    assert groups[("a", "mixture:1.0")] == ["b"] and groups[("c", "mixture:1.0")] == []
    assert groups[("d", "mixture:1.0")] == []


def test_sweeps_in_one_shared_data_group_really_share_the_labelled_data():
    base = ExperimentConfig(name="a", scenarios=("mixture:1.0",), n=(100,), M=2, reps=4, n_pop=500, n_eval=20,
                            methods=("mle",), g=(), progress=False)
    a = run_experiment(base, write=False)
    b = run_experiment(base.replace(M=8, aux_prompts="fresh"), write=False)
    c = run_experiment(base.replace(seed=1), write=False)
    cols = [f"theta_{j}" for j in range(4)]
    np.testing.assert_array_equal(a[cols].to_numpy(), b[cols].to_numpy())
    assert not np.allclose(a[cols].to_numpy(), c[cols].to_numpy())


def test_theory_cli_prints_the_holm_summary(tmp_path, capsys):
    from vrpo_cli.main import main

    code = main(["theory", "--scenarios", "mixture:1.0", "--n", "300", "--reps", "20", "--g", "oracle", "--n-ctx",
                 "2000", "--n-batches", "4", "--n-min", "300", "--n-pop", "1000", "--n-eval", "50", "--no-progress",
                 "--output", str(tmp_path / "t.parquet")])
    out = capsys.readouterr().out
    assert code == 0 and "Holm over 13 comparisons at n >= 300" in out and "expected by chance" in out
