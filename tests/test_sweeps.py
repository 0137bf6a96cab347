"""The figure sweeps' cache (analysis.sweeps.load_or_run): a result file is reused only for the same
configuration and the same code."""

from __future__ import annotations

import sim.runner as runner
from analysis.sweeps import load_or_run
from sim import ExperimentConfig


def test_load_or_run_reruns_when_the_code_fingerprint_changes(tmp_path, monkeypatch):
    cfg = ExperimentConfig(d=3, K=5, dx=3, scale=4.0, n_pop=2000, n_eval=200, progress=False, scenarios=("bt",),
                           n=(60,), g=("oracle",), methods=("mle", "vr"), reps=6, chunk_size=6,
                           output=str(tmp_path / "s.parquet"))
    df0, meta0, hit = load_or_run(cfg)
    assert not hit
    df1, _, hit = load_or_run(cfg)
    assert hit and df1.equals(df0)
    real = runner.code_fingerprint
    monkeypatch.setattr(runner, "code_fingerprint", lambda c, s: "0" * 16 if s == "bt" else real(c, s))
    df2, meta2, hit = load_or_run(cfg)
    assert not hit  # same configuration, other code: recomputed
    assert meta2["code_fingerprint"] == {"bt": "0" * 16} != meta0["code_fingerprint"]
    assert load_or_run(cfg)[2]  # and cached again under the new code
