"""Plots of Monte Carlo summaries (matplotlib/seaborn), with MC error bars."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from vrpo_common.fileio import atomic_path  # noqa: E402
from vrpo_common.stats import Z95  # noqa: E402

METHOD_STYLE = {
    "mle": dict(color="#444444", marker="o", label="BT-MLE"),
    "vr": dict(color="#1f77b4", marker="s", label="VR (lam=1)"),
    "vr-auto": dict(color="#d62728", marker="^", label="VR-auto"),
}


def method_style(method: str) -> dict:
    return dict(METHOD_STYLE.get(method, dict(marker="D", label=method)))


def save_figure(fig, path, formats=("png",)) -> list[Path]:
    """Save ``fig`` atomically under ``path`` (suffix replaced per format); returns the paths."""
    path = Path(path)
    out = []
    for fmt in formats:
        target = path.with_suffix("." + fmt)
        with atomic_path(target, suffix="." + fmt) as tmp:
            fig.savefig(tmp, dpi=150, bbox_inches="tight", format=fmt)
        out.append(target)
    plt.close(fig)
    return out


def plot_regret_vs_n(summ: pd.DataFrame, path, formats=("png",), theory: pd.DataFrame | None = None):
    """Regret under ``r*`` vs n (log-log), one panel per scenario x g, MC error bars (+-1.96 SE).

    ``summ`` is :func:`sim.summary.summarize` output. MLE rows (``g == "none"``) are
    drawn in every panel. ``theory`` (optional) has columns scenario, g, method,
    ``regret_const`` (``tr(G V)/(2 beta)``), drawn as ``regret_const / n`` lines.
    """
    scen = list(dict.fromkeys(summ["scenario"]))
    gs = [g for g in dict.fromkeys(summ["g"]) if g != "none"] or ["none"]
    fig, axes = plt.subplots(len(scen), len(gs), figsize=(4.2 * len(gs), 3.4 * len(scen)), squeeze=False,
                             sharex=True)
    for i, s in enumerate(scen):
        for j, g in enumerate(gs):
            ax = axes[i, j]
            sub = summ[(summ["scenario"] == s) & ((summ["g"] == g) | (summ["g"] == "none"))]
            for method, grp in sub.groupby("method", sort=False):
                grp = grp.sort_values("n")
                st = method_style(method)
                ax.errorbar(grp["n"], grp["regret"], yerr=Z95 * grp["regret_se"], capsize=3, lw=1.5, ms=5, **st)
                if theory is not None:
                    th = theory[(theory["scenario"] == s) & (theory["method"] == method)
                                & ((theory["g"] == g) | (theory["g"] == "none"))]
                    if len(th):
                        nn = np.array(sorted(grp["n"]))
                        ax.plot(nn, float(th["regret_const"].iloc[0]) / nn, ls="--", color=st.get("color"), lw=1)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ns = sorted(set(sub["n"]))
            ax.set_xticks(ns, [str(int(v)) for v in ns])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_title(f"{s}, g = {g}", fontsize=10)
            ax.set_xlabel("labelled pairs n")
            ax.set_ylabel("regret under r* (E over reps)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    reps = int(summ["reps"].max())
    fig.suptitle(f"Regret vs n (error bars: 95% MC intervals, up to {reps} replications per point)", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path, formats)
