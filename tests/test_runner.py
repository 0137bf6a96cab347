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


def _count_chunks(monkeypatch) -> list:
    """Record ``(scenario, n)`` of every chunk the runner computes (the list fills as it runs)."""
    calls = []
    orig = runner.run_cell_chunk

    def counting(cfg_, task, pop):
        calls.append((task.scenario, task.n))
        return orig(cfg_, task, pop)

    monkeypatch.setattr(runner, "run_cell_chunk", counting)
    return calls


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
    calls = _count_chunks(monkeypatch)
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


# ----------------------------------------------------------------- issue 8: caches, config types, output, workers

PLUGIN = '''
from sim import Scenario, register_scenario, sigmoid


@register_scenario("edited", overwrite=True)
class Edited(Scenario):
    """A plugin scenario the test edits between runs."""

    def p_star(self, x, phi1, phi2):
        return sigmoid({factor} * self.du(phi1, phi2))
'''


def _counting(monkeypatch):
    calls = _count_chunks(monkeypatch)
    return calls


def test_cache_key_covers_the_plugin_source(tmp_path, monkeypatch):
    """Editing a plugin scenario's p_star must recompute its cells (it used to resume the
    old numbers while the metadata's theta* came from the new code); editing only its
    docstring or comments must not."""
    from vrpo_cli.cmd_run import import_plugins

    plug = tmp_path / "plug.py"
    plug.write_text(PLUGIN.format(factor="1.0"))
    import_plugins([str(plug)])
    cfg = _cfg(tmp_path, scenarios=("edited",), n=(200,), reps=4, methods=("mle",), g=())
    first = run_experiment(cfg)
    plug.write_text(PLUGIN.format(factor="0.25"))
    import_plugins([str(plug)])
    calls = _counting(monkeypatch)
    second = run_experiment(cfg)
    assert calls == [("edited", 200)]  # recomputed, not resumed
    pd.testing.assert_frame_equal(second, run_experiment(cfg, write=False))
    assert not np.allclose(first["theta_0"], second["theta_0"])
    _, meta = read_results(cfg.output)
    pop = runner.populations(cfg)["edited"]
    np.testing.assert_allclose(meta["theta_star"]["edited"], pop.theta_star)  # table and metadata: same code
    # prose-only edit: same AST, cache reused
    plug.write_text(PLUGIN.format(factor="0.25").replace("A plugin scenario", "The plugin scenario") + "# note\n")
    import_plugins([str(plug)])
    calls.clear()
    pd.testing.assert_frame_equal(run_experiment(cfg), second)
    assert calls == []


def test_code_fingerprint_covers_estimator_sim_and_class_files(tmp_path, monkeypatch):
    from pathlib import Path

    cfg = _cfg(tmp_path, scenarios=("bt",), g=("oracle",))
    seen = []
    orig = runner._normalised_source

    def spy(path):
        seen.append(Path(path).name if Path(path).parent.name in ("vrpo", "sim") else str(path))
        return orig(path)

    monkeypatch.setattr(runner, "_normalised_source", spy)
    monkeypatch.setattr(runner, "_DIGESTS", {})  # no digests cached by earlier tests
    a = runner.code_fingerprint(cfg, "bt")
    assert {"fit.py", "separation.py", "variance.py", "data.py", "aux_models.py", "scenarios.py", "runner.py",
            "policy.py", "population.py", "bandit.py"} <= set(seen)
    assert a == runner.code_fingerprint(cfg, "bt")  # deterministic
    # the key changes with the fingerprint
    assert runner._cell_hash(cfg, "bt", 200, "a" * 16) != runner._cell_hash(cfg, "bt", 200, "b" * 16)


def test_mislabeled_or_corrupt_cell_file_is_rejected(tmp_path, monkeypatch):
    """A valid cell file under another cell's name used to be accepted (one cell missing,
    another duplicated, exit 0). Each cell file stores its identity and is checked."""
    import shutil

    cfg = _cfg(tmp_path, scenarios=("bt",), n=(200, 400), reps=4)
    ref = run_experiment(cfg)
    keys = {n: runner._cell_hash(cfg, "bt", n) for n in (200, 400)}
    cells = tmp_path / "r.cells"
    shutil.copy(cells / f"{keys[200]}.parquet", cells / f"{keys[400]}.parquet")
    calls = _counting(monkeypatch)
    with pytest.warns(UserWarning, match=r"holds cell \['bt', 200\].*not cell \['bt', 400\].*rejected"):
        again = run_experiment(cfg)
    assert set(calls) == {("bt", 400)}
    pd.testing.assert_frame_equal(again, ref)
    # a truncated cell file is recomputed too
    f = cells / f"{keys[200]}.parquet"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.warns(UserWarning, match="unreadable"):
        pd.testing.assert_frame_equal(run_experiment(cfg), ref)


@pytest.mark.parametrize(
    "text, match",
    [
        ("n = [250.0]", r"n must be a list of integers >= 2, got 250\.0 \(float\); write 250"),
        ("reps = 10.0", r"reps must be an integer, got 10\.0 \(float\); write 10"),
        ("M = 2.0", r"M must be an integer, got 2\.0"),
        ("reps = 1e9", r"reps must be an integer, got 1000000000\.0 \(float\)"),
        ('alpha = "0.05"', r"alpha must be a number, got '0\.05' \(str\)"),
        ("seed = -1", r"seed must be an integer >= 0, got -1"),
        ("d = true", r"d must be an integer, got True \(bool\)"),
        ("scenarios = [1]", r"scenarios must be a list of strings, got 1 \(int\)"),
        ("progress = 1", r"progress must be true or false"),
        ('output = "out.txt"', r"output must end in \.parquet or \.csv"),
    ],
)
def test_config_file_field_types_are_named(tmp_path, text, match):
    f = tmp_path / "c.toml"
    f.write_text(text + "\n")
    with pytest.raises(ValueError, match=match):
        ExperimentConfig.from_file(f)


def test_cli_config_type_error_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VRPO_TRACEBACK", raising=False)
    f = tmp_path / "c.toml"
    f.write_text("reps = 10.0\n")
    assert cli_main(["run", "--config", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"vrpo run: error: {f}: reps must be an integer, got 10.0 (float); write 10"


def test_output_directory_and_bad_suffix_rejected_before_the_sweep(tmp_path, monkeypatch, capsys):
    calls = _counting(monkeypatch)
    (tmp_path / "dir.parquet").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        run_experiment(_cfg(tmp_path, output=str(tmp_path / "dir.parquet")))
    with pytest.raises(ValueError, match=r"output must end in \.parquet or \.csv"):
        _cfg(tmp_path, output=str(tmp_path / "r.txt"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        run_experiment(_cfg(tmp_path, output=str(tmp_path / "file" / "r.parquet")))
    monkeypatch.delenv("VRPO_TRACEBACK", raising=False)
    assert cli_main(["run", "--reps", "2", "--output", str(tmp_path)]) == 2
    assert "output must end in .parquet or .csv" in capsys.readouterr().err
    assert cli_main(["run", "--reps", "2", "--output", str(tmp_path / "dir.parquet")]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert calls == []  # rejected before any replication ran


def test_summary_reports_separable_replications(tmp_path, capsys):
    """The issue's sweep (bt, n = 8, MLE): nearly every sample is separable. They must be
    excluded from the summary and reported, not averaged in as converged fits."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from lp_oracle import separable_labels
    from sim.bandit import Bandit
    from sim.data import PairData, sample_pairs
    from sim.scenarios import make_scenario

    cfg = ExperimentConfig(scenarios=("bt",), n=(8, 30), reps=40, methods=("mle",), g=(), progress=False,
                           n_pop=2000, n_eval=100, output=str(tmp_path / "s.parquet"))
    df = run_experiment(cfg, write=False)
    b = Bandit(cfg.bandit_spec)
    sc = make_scenario("bt", b)
    for n in cfg.n:
        data = PairData.stack([sample_pairs(runner.rep_generator(0, "bt", n, r, 0), b, sc, n, cfg.M)
                               for r in range(cfg.reps)])
        sep = np.array([separable_labels(data.X[r], data.Z[r]) for r in range(cfg.reps)])
        sub = df[df.n == n].sort_values("rep")
        assert (sub["status"].to_numpy() == np.where(sep, "separable", "converged")).all()
        assert (sub["converged"].to_numpy() == ~sep).all()
    s = summarize(df)
    row = s[s.n == 8].iloc[0]
    assert row["separable"] == row["nonconverged"] >= 35 and row["reps"] == 40 - row["nonconverged"]
    from sim.summary import format_summary

    assert "excluded" in format_summary(s)


def test_plugin_scenario_runs_in_loky_workers(tmp_path):
    """Plugins registered in the parent used to be unknown in worker processes (KeyError)."""
    from vrpo_cli.cmd_run import import_plugins

    plug = tmp_path / "plug2.py"
    plug.write_text(PLUGIN.format(factor="0.5"))
    import_plugins([str(plug)])
    cfg = _cfg(tmp_path, scenarios=("edited",), n=(200,), reps=4, chunk_size=2, g=("oracle",))
    a = run_experiment(cfg, write=False)
    b = run_experiment(cfg.replace(n_jobs=2, backend="loky"), write=False)
    pd.testing.assert_frame_equal(a, b)


SLOW_DRIVER = '''
import sys
from vrpo_cli.cmd_run import import_plugins
import_plugins([sys.argv[1]])
from sim import ExperimentConfig, run_experiment
cfg = ExperimentConfig(scenarios=("slow",), n=(50,), reps=200, chunk_size=2, n_jobs=2, backend="loky",
                       methods=("mle",), g=(), d=3, K=4, dx=3, n_pop=200, n_eval=20, progress=False,
                       output=sys.argv[2])
run_experiment(cfg, write=False)
'''

SLOW_PLUGIN = '''
import os
import time
from pathlib import Path
from sim import Scenario, register_scenario, sigmoid


@register_scenario("slow", overwrite=True)
class Slow(Scenario):
    def p_star(self, x, phi1, phi2):
        (Path(__file__).parent / f"computing.{os.getpid()}").touch()  # tells the test who computes
        time.sleep(0.3)
        return sigmoid(self.du(phi1, phi2))
'''


def _children(pid):
    import glob

    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out.append(int(stat.split("/")[2]))
        except (OSError, ValueError, IndexError):
            pass
    return out


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_loky_workers_exit_when_the_parent_is_killed(tmp_path):
    """SIGKILL the sweep's process: its loky workers used to keep computing for nobody."""
    import os
    import signal
    import subprocess
    import sys
    import time

    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc (Linux) to find the worker processes")
    (tmp_path / "slow.py").write_text(SLOW_PLUGIN)
    (tmp_path / "driver.py").write_text(SLOW_DRIVER)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "slow.py"),
                             str(tmp_path / "r.parquet")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.time() + 180
        computing = []
        while time.time() < deadline and len(computing) < 2:  # both workers inside a chunk
            time.sleep(0.5)
            workers = [p for p in _children(proc.pid) if "LokyProcess" in _cmdline(p)]
            computing = [p for p in workers if (tmp_path / f"computing.{p}").exists()]
            assert proc.poll() is None, "the sweep ended before its workers could be observed"
        assert len(computing) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 20
        alive = workers
        while alive and time.time() < deadline:
            time.sleep(0.25)
            alive = [p for p in workers if _cmdline(p)]
        assert alive == [], f"workers {alive} outlived their killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in workers:
            if _cmdline(p):
                os.kill(p, signal.SIGKILL)
