"""vrpo validate (analysis.validate): the plan, the decisions, and a validation that can fail.

The full quick validation (about 3-4 min on 2 cores) is run by CI as
``vrpo validate --quick --n-jobs 2 --json``; these tests are seconds-long versions of its parts.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from analysis import validate as V
from analysis.mutants import MUTANTS
from analysis.validate_report import read_summary, render_validation_section
from vrpo_common.stats import holm


def _level_plan(mutants=("G-ref",), reps=600, n=2000, seed=1):
    cell = V._cell("level", V._spec(seed), "prompt-type:1.0", n, reps, M=1, lams=(0.0,), auto=False,
                   checks=("level",), mutants=mutants)
    return V.Plan(mode="test", seed=0, cells=(cell,), n_ctx=4000, n_batches=8, selfg_reps=3)


@pytest.fixture(scope="module")
def level_run():
    return V.run_validation(plan=_level_plan(), cache_dir=None, progress=False)


def test_plans_are_independent_and_cover_every_mutant():
    for mode in ("quick", "default"):
        plan = V.make_plan(mode)
        names = [c.name for c in plan.cells]
        assert len(set(names)) == len(names)  # the name seeds the cell: distinct names, independent streams
        covered = set().union(*(c.mutants for c in plan.cells))
        assert covered == set(MUTANTS), (mode, set(MUTANTS) - covered)
        assert min(c.reps for c in plan.cells) >= 1000
        ratio_cells = [c for c in plan.cells if "ratio" in c.checks]
        assert ratio_cells and min(c.reps for c in ratio_cells) >= 2000  # >= 2000 replications per reported ratio
        assert len({c.spec.seed for c in plan.cells if c.scenario == "prompt-type:1.0"}) >= 2  # several instances
    with pytest.raises(ValueError, match="mode"):
        V.make_plan("fast")


def test_replication_streams_do_not_depend_on_chunking():
    c = V._cell("sandwich", V._spec(1), "prompt-type:1.0", 300, 40, g="noisy:1.0", auto=True, checks=("sandwich",),
                mutants=("labelled-hessian",))
    th = np.zeros(c.spec.d)
    whole = V.simulate_chunk(0, c, 0, 40, th, None)
    parts = [V.simulate_chunk(0, c, lo, lo + 10, th, None) for lo in range(0, 40, 10)]
    for k in ("theta:mle", "theta:vr:1", "lam:vr-auto", "sand_lab:vr:1"):
        np.testing.assert_array_equal(whole[k], np.concatenate([p[k] for p in parts]), err_msg=k)


def test_holm_decisions_and_exit_code():
    rows = []
    for z in (0.5, -1.0, 2.0):
        rows.append(V._row("theory", "s", _level_plan().cells[0], "mle", z, 1.0, 0.0, 0.0))
    rows.append(V._row("mutant", "s", _level_plan().cells[0], "mle", 12.0, 1.0, 0.0, 0.0, mutant="G-ref"))
    rows.append(V._row("mutant", "s", _level_plan().cells[0], "mle", 1.0, 1.0, 0.0, 0.0, mutant="model-based"))
    s = V._decide(rows)
    assert s["theory_rejected"] == 0 and s["theory_checks"] == 3
    assert s["mutants"]["G-ref"]["killed"] and not s["mutants"]["model-based"]["killed"]
    assert s["expected_flagged"] == pytest.approx(3 * 0.0026998, rel=1e-3)
    np.testing.assert_allclose([r["p_holm"] for r in rows[:3]], holm([r["p"] for r in rows[:3]]))
    res = {"summary": s, "self_g": {"passed": True}}
    assert V.exit_code(res) == 1  # a mutant survives (and others are untested)


def test_lam_argmin_recovers_the_minimiser_of_a_quadratic():
    """theta(lam) = e + lam delta exactly: tr Cov is quadratic, its argmin -<e,delta>/|delta|^2."""
    rng = np.random.default_rng(0)
    R, d = 4000, 3
    delta = rng.standard_normal((R, d))
    e = -0.3 * delta + rng.standard_normal((R, d))
    lam, se = V.lam_argmin([e, e + 0.5 * delta, e + delta])
    ec, dc = e - e.mean(0), delta - delta.mean(0)
    assert lam == pytest.approx(-np.sum(ec * dc) / np.sum(dc * dc), rel=1e-6)
    assert abs(lam - 0.3) < 4 * se and 0.005 < se < 0.05


def test_correct_theory_passes_and_mutant_is_killed(level_run):
    s = level_run["summary"]
    assert s["theory_rejected"] == 0
    assert s["mutants"]["G-ref"]["killed"] and s["mutants"]["G-ref"]["max_abs_z"] > 6
    assert level_run["self_g"]["passed"]
    # every number the fragment states comes from the result: change one, the text changes
    text = render_validation_section(level_run)
    assert read_summary(text)["mutants"]["G-ref"]["killed"] is True
    broken = json.loads(json.dumps(level_run, default=float))
    broken["summary"]["mutants"]["G-ref"]["killed"] = False
    text2 = render_validation_section(broken)
    assert "**survives**" in text2 and "**survives**" not in text


def test_the_validation_can_fail(monkeypatch):
    """Give the 'correct' family a wrong G (pi_ref): its regret check is rejected and the run exits 1."""
    orig = V._Theories.eval_set

    def swapped(self, spec, scenario):
        ev = dict(orig(self, spec, scenario))
        ev["G"], ev["G_ref"] = ev["G_ref"], ev["G"]
        return ev

    monkeypatch.setattr(V._Theories, "eval_set", swapped)
    res = V.run_validation(plan=_level_plan(), cache_dir=None, progress=False)
    assert res["summary"]["theory_rejected"] >= 1
    bad = [r for r in res["rows"] if r["family"] == "theory" and r["rejected"]]
    assert bad and all(r["statistic"] == "n E[regret]" for r in bad) and "diagnosis" in bad[0]
    assert V.exit_code(res) == 1


def test_results_do_not_depend_on_workers(level_run):
    again = V.run_validation(plan=_level_plan(), cache_dir=None, progress=False, n_jobs=2)
    a = [(r["statistic"], r["sim"], r["z"]) for r in level_run["rows"]]
    b = [(r["statistic"], r["sim"], r["z"]) for r in again["rows"]]
    assert a == b


def test_cli_prints_table_and_exit_code(monkeypatch, tmp_path, capsys, level_run):
    from vrpo_cli.main import main

    monkeypatch.setattr(V, "run_validation", lambda *a, **k: level_run)
    code = main(["validate", "--out", str(tmp_path / "v.json"), "--fragment", str(tmp_path / "v.md")])
    out = capsys.readouterr().out
    assert code == V.exit_code(level_run)
    assert "p(Holm)" in out and "mutant G-ref" in out and ("VALIDATION PASSED" in out or "VALIDATION FAILED" in out)
    assert json.loads((tmp_path / "v.json").read_text())["summary"]["theory_checks"] == level_run["summary"]["theory_checks"]
    assert "vrpo-summary" in (tmp_path / "v.md").read_text()
    code = main(["validate", "--json", "--out", str(tmp_path / "w.json")])
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["summary"]["mutants"]["G-ref"]["killed"] is True and code == V.exit_code(level_run)
