"""Figure generation smoke test: every figure and the report from a tiny configuration, then from cache."""

from __future__ import annotations

import time

import pytest

import copy
import re
from pathlib import Path

import numpy as np

from analysis.figures import FIGURES, build_figure_set
from analysis.report import README_END, README_START, SECTION_ORDER, readme_block, render_report, write_report

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("figs")
    (out / "sections").mkdir()
    (out / "sections" / "hh_reward.md").write_text("## HH reward fragment\n\nnumbers from hh-reward\n"
                                                   '<!-- vrpo-summary: {"llm_vr_ratio_median": 2.5, '
                                                   '"llm_auto_ratio_median": 0.97} -->\n')
    t0 = time.time()
    fs = build_figure_set(out, smoke=True, n_jobs=1, progress=False)
    first = time.time() - t0
    report = write_report(fs)
    return out, fs, report, first


def test_every_figure_is_written(smoke_set):
    out, fs, _, _ = smoke_set
    assert [f["id"] for f in fs.figures] == [f[0] for f in FIGURES]
    for f in fs.figures:
        assert {p.suffix for p in f["paths"]} == {".png", ".pdf"}
        for p in f["paths"]:
            assert p.exists() and p.stat().st_size > 5000, p
        assert f["caption"] and len(f["caption"]) > 80


def test_report_includes_figures_tables_and_section_slot(smoke_set):
    out, fs, report, _ = smoke_set
    text = report.read_text()
    for f in fs.figures:
        assert f"![{f['id']}]({f['paths'][0].name})" in text
    assert "## 2. Theory vs simulation" in text and "n tr Cov(theta_hat) vs tr V" in text
    assert "numbers from hh-reward" in text  # an existing fragment is included verbatim
    assert "`sections/validation.md`" in text  # the validation slot notes its absence
    missing = [name for name, _ in SECTION_ORDER if name != "hh_reward.md"]
    for name in missing:
        assert f"`sections/{name}`" in text  # a missing fragment gets a note
    assert text.index("HH reward fragment") < text.index(f"`sections/{missing[0]}`")  # fixed order
    for name, cfg in fs.configs.items():
        assert f"- `{name}` (seed {cfg.seed};" in text


def test_second_build_reads_the_cache(smoke_set):
    out, fs, _, first = smoke_set
    fs2 = build_figure_set(out, smoke=True, n_jobs=1, progress=False, formats=("png",))
    assert fs2.data["all_cached"]
    for k in fs.tables:
        assert fs2.tables[k]["trV_th"].tolist() == pytest.approx(fs.tables[k]["trV_th"].tolist(), rel=1e-12)
        assert fs2.tables[k]["ntrcov_sim"].tolist() == pytest.approx(fs.tables[k]["ntrcov_sim"].tolist(), rel=1e-12)


def test_f7_and_its_table(smoke_set):
    out, fs, report, _ = smoke_set
    d = fs.data["lam1"]
    assert set(d["g"]) == set(fs.data["lam1_config"].gs) and set(d["n"]) == set(fs.data["lam1_config"].ns)
    assert np.all((d["nc_vr"] >= 0) & (d["nc_vr"] <= 1))
    assert "Table behind F7" in report.read_text()


def _sentence(text, start):
    return next(line for line in text.splitlines() if line.startswith(start))


def test_changing_a_result_changes_the_sentence(smoke_set):
    """Numbers and directions in the report are computed: perturb one result, the sentence follows."""
    out, fs, _, _ = smoke_set
    base = render_report(fs)
    fs2 = copy.copy(fs)
    fs2.tables = {k: v.copy() for k, v in fs.tables.items()}
    # 1. 'where lam = 1 hurts' lists exactly the g whose predicted ratio exceeds 1
    gq = fs2.tables["gquality"]
    sel = (gq["g"] == "oracle") & (gq["method"] == "vr")
    gq.loc[sel, "var_ratio_th"] = 1.5
    gq.loc[sel, "var_ratio_sim"] = 1.6
    hurt0 = _sentence(base, "- **Where lam = 1 hurts.**")
    hurt1 = _sentence(render_report(fs2), "- **Where lam = 1 hurts.**")
    assert "`oracle` predicted 1.500, simulated 1.600" in hurt1 and "`oracle` predicted" not in hurt0
    # 2. the sharper-label direction is computed from the reference and kappa sweeps
    fs3 = copy.copy(fs)
    fs3.tables = {k: v.copy() for k, v in fs.tables.items()}
    ref = fs3.tables["reference"]
    ref.loc[ref["method"] == "vr", "var_ratio_th"] = 0.99
    assert "the gain shrinks" in _sentence(render_report(fs3), "- **Where VR helps most.**")
    assert "the gain grows" in _sentence(base, "- **Where VR helps most.**")
    # 3. the F7 bullet quotes the study's numbers
    fs4 = copy.copy(fs)
    fs4.data = dict(fs.data)
    lam1 = fs.data["lam1"].copy()
    lam1.loc[lam1["n"] == lam1["n"].min(), "nc_vr"] = 0.5
    fs4.data["lam1"] = lam1
    assert "in 50-50% of fits" in _sentence(render_report(fs4), "- **No finite minimiser at lam = 1 (F7).**")
    # 4. the validation bullet follows the fragment's summary
    val = {"mode": "quick", "instances": 2, "min_reps": 1000, "mutants_killed": 6, "mutants_total": 7,
           "mutants": {"a": {"killed": True, "min_abs_z": 9.0, "max_abs_z": 20.0},
                       "b": {"killed": False, "min_abs_z": 1.0, "max_abs_z": 1.5}},
           "theory_checks": 40, "theory_rejected": 1, "holm_alpha": 0.001, "theory_flagged": 2, "expected_flagged": 0.11}
    txt = " ".join(readme_block(fs, val))
    assert "6 of 7 deliberately wrong" in txt and "passes 39 of 40 checks" in txt
    assert "largest effect between 1.5 and 20.0 SE" in txt


def test_readme_findings_are_the_reports_block():
    """README.md's 'What we found' bullets are the block REPORT.md computes (copy it after `vrpo figures`)."""
    report = (ROOT / "paper_figures" / "REPORT.md").read_text()
    readme = (ROOT / "README.md").read_text()
    block = report[report.index(README_START) + len(README_START):report.index(README_END)].strip()
    sec = readme[readme.index("## What we found"):]
    sec = sec[:sec.index("\n## ", 3)]
    bullets = "\n".join(line for line in sec.splitlines() if line.startswith("- ") or line.startswith("  "))
    assert bullets.strip() == block, "README 'What we found' differs from paper_figures/REPORT.md's README block"


def test_readme_states_the_theta_star_standard_error():
    """The README's theta* Monte Carlo SE for the default scenarios is the computed one (issue 10 item 5)."""
    from sim.config import ExperimentConfig
    from sim.runner import populations

    pops = populations(ExperimentConfig())
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"theta_star_se`?: 0 for `bt`, up to ([0-9.]+e-[0-9]+) for `mixture:1.0`", readme)
    assert m, "README must state theta*'s Monte Carlo SE for the default scenarios"
    # BT's theta* is exact (every population fit solves the same equation): zero up to rounding
    assert float(pops["bt"].theta_star_se.max()) < 1e-12
    assert float(m.group(1)) == float(f"{pops['mixture:1.0'].theta_star_se.max():.1e}")
