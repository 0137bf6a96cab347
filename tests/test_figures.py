"""Figure generation smoke test: every figure and the report from a tiny configuration, then from cache."""

from __future__ import annotations

import time

import pytest

from analysis.figures import FIGURES, build_figure_set
from analysis.report import SECTION_ORDER, write_report


@pytest.fixture(scope="module")
def smoke_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("figs")
    (out / "sections").mkdir()
    (out / "sections" / "hh_reward.md").write_text("## HH reward fragment\n\nnumbers from hh-reward\n")
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
