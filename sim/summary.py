"""Monte Carlo summaries: means with standard errors, and ``n tr Cov(theta_hat)``.

Every simulated number the suite reports goes through these functions, so each
carries its Monte Carlo standard error and replication count.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vrpo_common.stats import mean_se, trace_cov_se

GROUP = ["scenario", "kappa", "g", "method", "n"]
METRICS = ["err", "regret", "regret_u", "win_ref", "win_mle", "cover_frac", "ci_width", "lam"]


def theta_cols(df: pd.DataFrame) -> list[str]:
    return sorted((c for c in df.columns if c.startswith("theta_")), key=lambda c: int(c.split("_")[1]))


def summarize(df: pd.DataFrame, metrics=METRICS) -> pd.DataFrame:
    """One row per scenario x g x method x n: ``<metric>`` and ``<metric>_se`` columns,
    ``ntrcov`` (``n tr Cov(theta_hat)``) with its SE.

    Replications whose fit has no certified minimiser (``converged`` False: separable
    samples, an unbounded VR objective, a rank-deficient design; see the ``status``
    column) are excluded and counted in ``nonconverged``, the separable ones also in
    ``separable``; ``reps`` counts the rest. ``ntrcov`` needs at least two.
    """
    rows = []
    tc = theta_cols(df)
    for key, grp in df.groupby(GROUP, sort=False):
        row = dict(zip(GROUP, key))
        ok = grp["converged"].astype(bool).to_numpy()
        row["reps"] = int(ok.sum())
        row["nonconverged"] = int((~ok).sum())
        if "status" in grp:
            row["separable"] = int((grp["status"] == "separable").sum())
        grp = grp[ok]
        if grp.empty:
            rows.append(row)
            continue
        for m in metrics:
            if m in grp:
                row[m], row[m + "_se"] = mean_se(grp[m])
        if len(grp) >= 2:
            t, tse = trace_cov_se(grp[tc].to_numpy())
            row["ntrcov"], row["ntrcov_se"] = key[-1] * t, key[-1] * tse
        rows.append(row)
    return pd.DataFrame(rows)


def format_summary(summ: pd.DataFrame) -> str:
    """Human-readable table: mean +- MC standard error per method and n; ``reps`` counts the
    replications summarised, ``excluded`` those without a certified minimiser."""
    def pm(r, m, fmt="{:.4f}"):
        v, s = r.get(m, np.nan), r.get(m + "_se", np.nan)
        if not np.isfinite(v):
            return "-"
        return (fmt + " +- " + fmt).format(v, s) if np.isfinite(s) else fmt.format(v)

    out = pd.DataFrame({
        "scenario": summ["scenario"], "g": summ["g"], "method": summ["method"], "n": summ["n"], "reps": summ["reps"],
        "excluded": summ["nonconverged"],
        "n*regret": [pm({"x": r.regret * r.n, "x_se": r.regret_se * r.n}, "x", "{:.3f}") for r in summ.itertuples()],
        "n tr Cov": [pm(r._asdict(), "ntrcov", "{:.2f}") for r in summ.itertuples()],
        "win vs MLE": [pm(r._asdict(), "win_mle") for r in summ.itertuples()],
        "coverage": [pm(r._asdict(), "cover_frac", "{:.3f}") for r in summ.itertuples()],
        "lam": [pm(r._asdict(), "lam", "{:.2f}") for r in summ.itertuples()],
    })
    return out.to_string(index=False)
