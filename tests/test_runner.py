"""Monte Carlo runner: seeded statistical checks, reproducibility, resume, config, CLI."""

import json

import numpy as np
import pandas as pd
import pytest

import sim.runner as runner
from sim import ExperimentConfig, read_results, run_experiment, summarize
from sim.summary import theta_cols
from vrpo_cli.main import main as cli_main

SMALL = dict(d=3, K=5, dx=3, scale=4.0, n_pop=2000, n_eval=200, progress=False)


def _cfg(tmp_path, **kw):
    base = dict(SMALL, scenarios=("bt", "mixture:1.0"), n=(200, 400), g=("oracle", "noisy:1.0"),
                methods=("mle", "vr", "vr-auto"), reps=12, chunk_size=5, output=str(tmp_path / "r.parquet"))
    base.update(kw)
    return ExperimentConfig(**base)


# ----------------------------------------------------------------- seeded statistical checks


@pytest.fixture(scope="module")
def coverage_run(tmp_path_factory):
    """Mixture (strongly misspecified), aux pairs sharing the prompt: 600 replications, n = 1000."""
    cfg = ExperimentConfig(d=3, K=6, dx=3, scale=6.0, scenarios=("mixture:1.0",), n=(1000,), g=("oracle",),
                           methods=("mle", "vr"), M=4, reps=600, chunk_size=200, n_pop=20000, n_eval=100,
                           progress=False, seed=11, output=str(tmp_path_factory.mktemp("cov") / "c.parquet"))
    df = run_experiment(cfg, write=False)
    return df, runner.populations(cfg)["mixture:1.0"]


@pytest.mark.parametrize("method", ["mle", "vr"])
def test_estimates_are_unbiased_for_theta_star(coverage_run, method):
    """Mean of theta_hat equals theta* (the BT projection, not theta_0) within 4 SE per coordinate.

    The SE combines the replications' spread and theta*'s own Monte Carlo error; the O(1/n)
    finite-sample bias of the logistic MLE is far below this tolerance at n = 1000.
    """
    df, pop = coverage_run
    th = df[df.method == method][theta_cols(df)].to_numpy()
    se = np.sqrt(th.var(axis=0, ddof=1) / len(th) + pop.theta_star_se**2)
    z = (th.mean(axis=0) - pop.theta_star) / se
    assert np.all(np.abs(z) < 4), z
    # and theta* is far from the utility direction theta_0 at this strength (the estimand moved)
    assert np.linalg.norm(pop.theta_star - runner.Bandit(runner.ExperimentConfig(**{**SMALL, "d": 3, "K": 6, "scale": 6.0,
                          "seed": 11}).bandit_spec).theta_0) > 1.0


@pytest.mark.parametrize("method", ["mle", "vr"])
def test_wald_intervals_cover_at_nominal_rate(coverage_run, method):
    """95% clustered sandwich intervals: coverage consistent with 0.95 given 600 replications
    x 3 coordinates (tolerance 3.5 SE of the per-replication covered fraction)."""
    df, _ = coverage_run
    cov = df[df.method == method]["cover_frac"].to_numpy()
    se = max(cov.std(ddof=1), np.sqrt(0.95 * 0.05 / 3)) / np.sqrt(len(cov))
    assert abs(cov.mean() - 0.95) < 3.5 * se, (cov.mean(), se)


def test_vr_reduces_variance_in_misspecified_scenario(coverage_run):
    """With the oracle g in the mixture scenario VR's n tr Cov is below MLE's (paired by data)."""
    df, _ = coverage_run
    tc = theta_cols(df)
    a = df[df.method == "mle"][tc].to_numpy()
    b = df[df.method == "vr"][tc].to_numpy()
    da = np.sum((a - a.mean(0)) ** 2, 1)
    db = np.sum((b - b.mean(0)) ** 2, 1)
    diff = da - db
    assert diff.mean() > 3 * diff.std(ddof=1) / np.sqrt(len(diff))


# ----------------------------------------------------------------- reproducibility and resume


def test_same_table_whatever_chunk_size_and_workers(tmp_path):
    a = run_experiment(_cfg(tmp_path, chunk_size=5, n_jobs=1), write=False)
    b = run_experiment(_cfg(tmp_path, chunk_size=12, n_jobs=1), write=False)
    c = run_experiment(_cfg(tmp_path, chunk_size=4, n_jobs=2, backend="loky"), write=False)
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(a, c)
    assert len(a) == 2 * 2 * 12 * (1 + 2 * 2)  # scenarios x n x reps x (mle + 2 g x 2 methods)
    assert a["converged"].all()


def test_dask_backend_gives_the_same_table(tmp_path):
    pytest.importorskip("distributed")
    cfg = _cfg(tmp_path, scenarios=("mixture:1.0",), n=(200,), reps=6, chunk_size=3)
    a = run_experiment(cfg, write=False)
    b = run_experiment(cfg.replace(n_jobs=2, backend="dask"), write=False)
    pd.testing.assert_frame_equal(a, b)


def test_resume_recomputes_only_missing_cells(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    full = run_experiment(cfg)
    calls = []
    orig = runner.run_cell_chunk

    def counting(cfg_, task, pop):
        calls.append((task.scenario, task.n))
        return orig(cfg_, task, pop)

    monkeypatch.setattr(runner, "run_cell_chunk", counting)
    again = run_experiment(cfg)  # everything cached
    assert calls == []
    pd.testing.assert_frame_equal(full, again)
    # lose one cell: only its chunks run again
    cells = sorted((tmp_path / "r.cells").glob("*.parquet"))
    assert len(cells) == 4
    cells[0].unlink()
    resumed = run_experiment(cfg)
    assert len(set(calls)) == 1 and len(calls) == 3  # 12 reps / chunk 5 -> 3 chunks
    pd.testing.assert_frame_equal(full, resumed)


def test_interrupted_sweep_leaves_no_partial_file_and_resumes(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    reference = run_experiment(cfg, write=False)
    orig = runner.run_cell_chunk
    count = {"n": 0}

    def failing(cfg_, task, pop):
        count["n"] += 1
        if count["n"] == 7:
            raise KeyboardInterrupt("simulated interruption")
        return orig(cfg_, task, pop)

    monkeypatch.setattr(runner, "run_cell_chunk", failing)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg)
    assert not (tmp_path / "r.parquet").exists()
    assert not list(tmp_path.glob("*.tmp")) and not list((tmp_path / "r.cells").glob("*.tmp"))
    assert len(list((tmp_path / "r.cells").glob("*.parquet"))) == 2  # 6 chunks = 2 complete cells
    monkeypatch.setattr(runner, "run_cell_chunk", orig)
    pd.testing.assert_frame_equal(run_experiment(cfg), reference)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_results_carry_resolved_config(tmp_path, suffix):
    cfg = _cfg(tmp_path, scenarios=("bt",), n=(200,), reps=4, output=str(tmp_path / f"r{suffix}"))
    df = run_experiment(cfg)
    back, meta = read_results(cfg.output)
    assert meta["config"] == cfg.to_dict()
    assert len(meta["theta_star"]["bt"]) == 3
    pd.testing.assert_frame_equal(back[df.columns].reset_index(drop=True), df, check_dtype=False)


def test_summary_standard_errors_and_nonconverged_count(tmp_path):
    df = run_experiment(_cfg(tmp_path, scenarios=("bt",), n=(200,), reps=12), write=False)
    df.loc[df.index[0], "converged"] = False
    s = summarize(df)
    row = s[(s.method == "mle")].iloc[0]
    assert row["nonconverged"] == 1 and row["reps"] == 11
    x = df[(df.method == "mle")]["err"].to_numpy()[1:]
    assert row["err"] == pytest.approx(x.mean()) and row["err_se"] == pytest.approx(x.std(ddof=1) / np.sqrt(11))


# ----------------------------------------------------------------- config and CLI


def test_config_files_and_validation(tmp_path):
    (tmp_path / "c.toml").write_text('scenarios = ["flip:0.1"]\nn = [100, 300]\nreps = 7\n[unused]\n')
    with pytest.raises(ValueError, match="unknown config key"):
        ExperimentConfig.from_file(tmp_path / "c.toml")
    (tmp_path / "c.toml").write_text('[experiment]\nscenarios = ["flip:0.1"]\nn = [100, 300]\nreps = 7\n')
    cfg = ExperimentConfig.from_file(tmp_path / "c.toml")
    assert cfg.scenarios == ("flip:0.1",) and cfg.n == (100, 300) and cfg.reps == 7
    (tmp_path / "c.yaml").write_text("scenarios: [probit]\ng: [oracle, learned]\n")
    assert ExperimentConfig.from_file(tmp_path / "c.yaml").g == ("oracle", "learned")
    (tmp_path / "bad.toml").write_text("reps = [")
    with pytest.raises(ValueError, match="invalid TOML"):
        ExperimentConfig.from_file(tmp_path / "bad.toml")
    for kw, msg in [(dict(reps=1), "reps must be >= 2"), (dict(methods=("vr:-1",)), "unknown method"),
                    (dict(scenarios=("zzz",)), "unknown scenario"), (dict(aux_prompts="other"), "aux_prompts"),
                    (dict(n=(100, 100)), "duplicates"), (dict(pi_ref="greedy"), "pi_ref")]:
        with pytest.raises((ValueError, KeyError), match=msg):
            ExperimentConfig(**kw)


def test_cli_print_config_and_tiny_run(tmp_path, capsys):
    assert cli_main(["run", "--print-config", "--reps", "5", "--scenarios", "bt", "probit:0.5"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["reps"] == 5 and cfg["scenarios"] == ["bt", "probit:0.5"]
    out = tmp_path / "tiny.parquet"
    code = cli_main(["run", "--scenarios", "mixture:1", "--n", "200", "400", "--reps", "4", "--d", "3", "--K", "4",
                     "--n-pop", "500", "--n-eval", "50", "--output", str(out), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "n*regret" in text and "vr-auto" in text
    assert out.exists() and (tmp_path / "tiny_regret_vs_n.png").stat().st_size > 10_000


def test_plugin_scenario_from_the_readme_runs_via_cli(tmp_path, capsys):
    from pathlib import Path

    from sim import make_scenario
    from sim.bandit import Bandit, BanditSpec

    example = Path(__file__).resolve().parents[1] / "examples" / "custom_scenario.py"
    out = tmp_path / "plug.parquet"
    assert cli_main(["run", "--plugins", str(example), "--scenarios", "saturating:2", "--n", "200", "--reps", "3",
                     "--d", "3", "--n-pop", "500", "--n-eval", "50", "--output", str(out), "--no-progress"]) == 0
    df, meta = read_results(out)
    assert set(df["scenario"]) == {"saturating:2"} and meta["config"]["scenarios"] == ["saturating:2"]
    # the example reduces to BT at kappa = 0
    b = Bandit(BanditSpec(d=3))
    sc = make_scenario("saturating:0", b)
    x, a, c = np.zeros((5, 4)), np.random.default_rng(0).normal(size=(5, 3)), np.zeros((5, 3))
    np.testing.assert_allclose(sc.p_star(x, a, c), 1 / (1 + np.exp(-(a @ b.theta_0))), rtol=1e-9)


def test_cli_reports_bad_configuration_in_one_line(capsys, monkeypatch):
    monkeypatch.delenv("VRPO_TRACEBACK", raising=False)
    assert cli_main(["run", "--scenarios", "flip:0.9", "--reps", "3"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "vrpo run: error: scenario 'flip': kappa must lie in [0.0, 0.4999], got 0.9"
    assert cli_main(["run", "--scenarios", "nope"]) == 2
    assert "unknown scenario 'nope'; registered: bt" in capsys.readouterr().err
    monkeypatch.setenv("VRPO_TRACEBACK", "1")
    with pytest.raises(KeyError):
        cli_main(["run", "--scenarios", "nope"])
