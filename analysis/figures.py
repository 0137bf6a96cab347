"""The paper figure set F1-F7: drawing and captions, from the data of :mod:`analysis.sweeps`.

:func:`build_figure_set` loads the sweeps, the theory and the comparison tables
(:func:`analysis.sweeps.load_figure_data`, cached) and draws every figure (PNG +
PDF); it returns everything :mod:`analysis.report` needs.

Figures (each function returns the written paths and a caption):

- F1 :func:`fig_regret_vs_n` regret vs n with ``tr(G V) / (2 beta n)`` lines;
- F2 :func:`fig_ratio_vs_kappa` VR/MLE variance ratio vs kappa, one panel per scenario;
- F3 :func:`fig_g_quality` quality of ``g`` for ``lam = 1`` and power-tuned ``lam``;
- F4 :func:`fig_M_effect` number of extra pairs M, same vs fresh prompts;
- F5 :func:`fig_win_rate` win rates under ``p*`` vs n;
- F6 :func:`fig_coverage` 95% Wald interval coverage;
- F7 :func:`fig_lam1_finite_sample` the finite-sample side of ``lam = 1``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from vrpo_common.stats import Z95, wilson

from .plots import method_style, save_figure
from .sweeps import (G_LADDER, KAPPA_GRID, M_GRID, MISSPEC, FigureSet, figure_sweeps, load_figure_data, load_or_run,
                     m_sweeps_diagnosis)

__all__ = ["build_figure_set", "FIGURES", "figure_sweeps", "load_or_run", "FigureSet", "KAPPA_GRID", "G_LADDER",
           "M_GRID", "m_sweeps_diagnosis"]


# --------------------------------------------------------------------------- helpers


def _style():
    import seaborn as sns

    return sns.axes_style("whitegrid")


def _reps_text(summ) -> str:
    lo, hi = int(summ["reps"].min()), int(summ["reps"].max())
    return f"{hi}" if lo == hi else f"{lo}-{hi}"


def _err(v):
    return Z95 * np.asarray(v, float)


# --------------------------------------------------------------------------- F1


def fig_regret_vs_n(fs: FigureSet, formats):
    import matplotlib.pyplot as plt

    tab, summ = fs.tables["main"], fs.summaries["main"]
    scen = list(dict.fromkeys(summ["scenario"]))
    methods = [m for m in ("mle", "vr", "vr-auto") if m in set(summ["method"])]
    with _style():
        fig, axes = plt.subplots(2, len(scen), figsize=(4.8 * len(scen), 7.2), squeeze=False, sharex=True)
        for j, s in enumerate(scen):
            for k, method in enumerate(methods):
                st = method_style(method)
                g = summ[(summ["scenario"] == s) & (summ["method"] == method)].sort_values("n")
                th = tab[(tab["scenario"] == s) & (tab["method"] == method)]
                const = float(th["regret_const_th"].iloc[0])
                nn = g["n"].to_numpy(float)
                shift = nn * (1 + 0.03 * (k - 1))  # small horizontal offsets so error bars do not overlap
                axes[0, j].errorbar(shift, g["regret"], yerr=_err(g["regret_se"]), capsize=3, ms=5, lw=1.2, **st)
                axes[0, j].plot(nn, const / nn, ls="--", color=st["color"], lw=1)
                axes[1, j].errorbar(shift, nn * g["regret"], yerr=_err(nn * g["regret_se"]), capsize=3, ms=5, lw=1.2,
                                    **st)
                axes[1, j].axhline(const, ls="--", color=st["color"], lw=1)
            axes[0, j].set_yscale("log")
            axes[0, j].set_title(f"{s} (g = oracle)", fontsize=10)
            axes[0, j].set_ylabel("E[regret] under r*")
            axes[1, j].set_ylabel("n x E[regret]  (dashed: tr(GV)/(2 beta))")
            axes[1, j].set_xlabel("labelled pairs n")
            axes[1, j].set_xscale("log")
            ns = sorted(set(summ["n"]))
            axes[1, j].set_xticks(ns, [str(int(v)) for v in ns])
            axes[1, j].minorticks_off()
        axes[0, 0].legend(fontsize=8)
        fig.suptitle("Regret vs n: simulation (95% MC intervals) and theory tr(GV)/(2 beta n) (dashed)", fontsize=11)
        fig.tight_layout()
        paths = save_figure(fig, fs.out_dir / "F1_regret_vs_n", formats)
    cfg = fs.configs["main"]
    cap = (f"Regret under the projected reward r* = theta*.phi vs the number of labelled pairs n, BT-MLE, VR "
           f"(lam = 1) and VR-auto with the oracle g, in the well-specified `bt` scenario (left) and the misspecified "
           f"`{MISSPEC}` scenario (right). Top: E[regret] (log-log) with the theory lines tr(G V)/(2 beta n); bottom: "
           "n E[regret] with the constants tr(G V)/(2 beta)"
           + _bt_constants_note(tab) + ". "
           f"Means over {_reps_text(summ)} replications (common data for all methods) with 95% Monte Carlo intervals. "
           f"Sweep `main` (seed {cfg.seed}, scale {cfg.scale:g}, d = {cfg.d}, K = {cfg.K}, M = {cfg.M}).")
    return paths, cap


def _bt_constants_note(tab) -> str:
    bt = tab[tab["scenario"] == "bt"].drop_duplicates("method")
    if len(bt) < 2:
        return ""
    c = bt["regret_const_th"].to_numpy(float)
    return f" (under BT the methods' constants differ by at most {np.max(np.abs(c / c[0] - 1)):.1e} relatively)"


# --------------------------------------------------------------------------- F2


def fig_ratio_vs_kappa(fs: FigureSet, formats):
    import matplotlib.pyplot as plt

    tab = fs.tables["kappa"]
    tab = tab[tab["method"] == "vr"].copy()
    tab["family"] = tab["scenario"].str.split(":").str[0]
    fams = list(dict.fromkeys(tab["family"]))
    ncol = min(3, len(fams))
    nrow = int(np.ceil(len(fams) / ncol))
    with _style():
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 2.9 * nrow), squeeze=False, sharey=True)
        for ax, fam in zip(axes.flat, fams):
            sub = tab[tab["family"] == fam].sort_values("kappa")
            k = np.concatenate([[0.0], sub["kappa"].to_numpy()])
            th = np.concatenate([[1.0], sub["var_ratio_th"].to_numpy()])  # kappa = 0 is BT: ratio exactly 1
            ax.plot(k, th, "-", color="#1f77b4", lw=1.5, label="theory tr V_VR / tr V_MLE")
            ax.errorbar(sub["kappa"], sub["var_ratio_sim"], yerr=_err(sub["var_ratio_sim_se"]), fmt="s",
                        color="#1f77b4", mfc="white", capsize=3, ms=5, label="simulated n tr Cov ratio")
            ax.axhline(1.0, color="#444444", lw=0.8, ls=":")
            ax.set_title(fam, fontsize=10)
            ax.set_xlabel("misspecification strength kappa")
        for ax in axes[:, 0]:
            ax.set_ylabel("variance ratio VR / MLE")
        for ax in list(axes.flat)[len(fams):]:
            ax.set_visible(False)
        axes[0, 0].legend(fontsize=7, loc="upper right")
        n = int(tab["n"].iloc[0])
        fig.suptitle(f"VR (lam = 1, oracle g, M = {fs.configs['kappa'].M}) / BT-MLE variance, n = {n}", fontsize=11)
        fig.tight_layout()
        paths = save_figure(fig, fs.out_dir / "F2_variance_ratio_vs_kappa", formats)
    summ = fs.summaries["kappa"]
    cap = ("Variance ratio tr Cov(VR) / tr Cov(MLE) against the misspecification strength kappa, one panel per scenario "
           "of the zoo (kappa = 0 is Bradley-Terry, where the ratio is exactly 1). Squares: simulated ratio of n tr Cov "
           f"over {_reps_text(summ)} paired replications at n = {int(tab['n'].iloc[0])}, 95% delta-method intervals; "
           "lines: the predicted ratio tr V_VR / tr V_MLE. The kappa scales differ between scenarios (see docs/method.md s5). "
           f"Sweep `kappa` (seed {fs.configs['kappa'].seed}, oracle g, M = {fs.configs['kappa'].M}, same prompts).")
    return paths, cap


# --------------------------------------------------------------------------- F3


def fig_g_quality(fs: FigureSet, formats):
    import matplotlib.pyplot as plt

    tab = fs.tables["gquality"]
    gs = [g for g in G_LADDER if g in set(tab["g"])] + [g for g in dict.fromkeys(tab["g"]) if g not in G_LADDER + ("none",)]
    x = np.arange(len(gs))
    with _style():
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(max(8.5, 0.85 * len(gs) + 4), 6.4), sharex=True,
                                      gridspec_kw=dict(height_ratios=[2, 1]))
        for j, method in enumerate(["vr", "vr-auto"]):
            st = method_style(method)
            sub = tab[tab["method"] == method].set_index("g").reindex(gs)
            off = (j - 0.5) * 0.22
            ax.errorbar(x + off, sub["var_ratio_sim"], yerr=_err(sub["var_ratio_sim_se"]), fmt=st["marker"],
                        color=st["color"], capsize=3, ms=6, label=f"{st['label']}: simulated")
            ax.scatter(x + off, sub["var_ratio_th"], marker="_", s=300, color=st["color"], lw=2,
                       label=f"{st['label']}: theory", zorder=3)
            for xi, nc in zip(x + off, sub["nonconverged"]):
                if nc > 0:
                    ax.annotate(f"{int(nc)} n.c.", (xi, 1.0), fontsize=6, rotation=90, ha="center", va="bottom",
                                color=st["color"])
            ax2.errorbar(x + off, sub["lam_sim"], yerr=_err(sub["lam_sim_se"]), fmt=st["marker"], color=st["color"],
                         capsize=3, ms=5, label=f"{st['label']}: mean lam used")
        auto = tab[tab["method"] == "vr-auto"].set_index("g").reindex(gs)
        ax2.scatter(x + 0.11, auto["lam_th"], marker="_", s=300, color="#d62728", lw=2, label="optimal lam (theory)")
        ax.axhline(1.0, color="#444444", lw=1, ls=":", label="BT-MLE")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_ylabel("variance ratio VR / MLE (log)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax2.set_ylabel("lam")
        ax2.set_ylim(-0.05, 1.1)
        ax2.set_xticks(x, gs, rotation=30, ha="right")
        ax2.set_xlabel("auxiliary model g (best to worst; self and learned last)")
        ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        cfg = fs.configs["gquality"]
        fig.suptitle(f"Quality of g: {MISSPEC}, n = {cfg.n[0]}, M = {cfg.M}", fontsize=11)
        fig.tight_layout()
        paths = save_figure(fig, fs.out_dir / "F3_g_quality", formats)
    summ = fs.summaries["gquality"]
    cap = (f"Quality of the auxiliary model g in `{MISSPEC}` (n = {cfg.n[0]}, M = {cfg.M}): top, variance ratio "
           "n tr Cov(VR) / n tr Cov(MLE) for lam = 1 (blue) and the power-tuned lam (red), simulated over "
           f"{_reps_text(summ)} paired replications (95% intervals) with the predicted ratio as a bar; values above 1 "
           "mean VR is worse than the MLE. 'n.c.' counts fits flagged as not converged (unbounded VR objective), "
           "excluded. Bottom: the lam actually used (1, or the mean data-tuned value) and the population optimum "
           "clipped to [0, 1]. For `self` the correction term is identically zero at the MLE, so VR is the MLE for "
           "every lam and the data-tuned lam is set to 0" + _learned_note(tab) + f". Sweep `gquality` (seed {cfg.seed}).")
    return paths, cap


def _learned_note(tab) -> str:
    a = tab[(tab["g"] == "learned:5") & (tab["method"] == "vr-auto")]
    if a.empty:
        return ""
    r = a.iloc[0]
    rel = "below" if r.lam_sim < r.lam_th else "above"
    return (f"; for `learned:5` the theory is that of the limiting g, and the mean data-tuned lam "
            f"({r.lam_sim:.2f}) is {rel} that limit's optimum ({r.lam_th:.2f}): at this n the cross-fitted g differs "
            "from its limit")


# --------------------------------------------------------------------------- F4


def fig_M_effect(fs: FigureSet, formats):
    import matplotlib.pyplot as plt

    rows = [t.assign(sweep=k) for k, t in fs.tables.items() if k.startswith("M")]
    tab = pd.concat(rows, ignore_index=True)
    tab = tab[tab["method"] != "mle"]
    with _style():
        fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8), sharey=True)
        for ax, method in zip(axes, ["vr", "vr-auto"]):
            st = method_style(method)
            for prompts, ls, mfc in (("same", "-", None), ("fresh", "--", "white")):
                sub = tab[(tab["method"] == method) & (tab["aux_prompts"] == prompts)].sort_values("M")
                ax.plot(sub["M"], sub["var_ratio_th"], ls=ls, color=st["color"], lw=1.5,
                        label=f"{prompts} prompts: theory")
                ax.errorbar(sub["M"], sub["var_ratio_sim"], yerr=_err(sub["var_ratio_sim_se"]), fmt=st["marker"],
                            color=st["color"], mfc=mfc or st["color"], capsize=3, ms=6, ls="none",
                            label=f"{prompts} prompts: simulated")
            ax.axhline(1.0, color="#444444", lw=0.8, ls=":")
            ax.set_xscale("log", base=2)
            ax.set_xticks(M_GRID if len(set(tab["M"])) > 2 else sorted(set(tab["M"])))
            ax.get_xaxis().set_major_formatter(plt.ScalarFormatter())
            ax.set_xlabel("extra pairs per labelled prompt, M")
            ax.set_title(st["label"], fontsize=10)
        axes[0].set_ylabel("variance ratio VR / MLE")
        axes[0].legend(fontsize=7)
        n = int(tab["n"].iloc[0])
        fig.suptitle(f"Effect of M and of fresh prompts ({tab['scenario'].iloc[0]}, oracle g, n = {n})", fontsize=11)
        fig.tight_layout()
        paths = save_figure(fig, fs.out_dir / "F4_M_and_fresh_prompts", formats)
    reps = int(tab["reps"].max())
    vr = tab[tab["method"] == "vr"]
    th = {d: vr[vr["aux_prompts"] == d].sort_values("M") for d in ("same", "fresh")}
    span = "; ".join(f"{d} prompts: predicted {t['var_ratio_th'].iloc[0]:.3f} at M = {int(t['M'].iloc[0])} to "
                     f"{t['var_ratio_th'].iloc[-1]:.3f} at M = {int(t['M'].iloc[-1])}" for d, t in th.items() if len(t))
    cap = (f"Variance ratio VR / MLE against the number M of extra pairs per labelled prompt in `{tab['scenario'].iloc[0]}` "
           "(annotator type set by the prompt) with the "
           "oracle g: extra pairs sharing the labelled prompt (solid, filled) or drawn on fresh prompts (N = M n, "
           "dashed, open). Lines: theory; points: simulated ratio of n tr Cov over "
           f"up to {reps} paired replications, 95% intervals ({span}). With shared prompts VR removes "
           "(1 - 1/M) E_x Var(m|x), with fresh prompts (1 - 1/M) Var(m) (docs/method.md s3). "
           + _m_note(fs.data.get("m_diagnosis")) + " Sweeps `M<M>-same` and `M<M>-fresh` (seed 0).")
    return paths, cap


def _m_note(d) -> str:
    """The shared-data diagnosis of F4, from :func:`m_sweeps_diagnosis`."""
    if not d or d.get("mle_z") is None:
        return ""
    parts = []
    for design, v in d["designs"].items():
        zs = np.asarray(v["vr_z"])
        parts.append(f"{design}: VR z from {zs.min():+.1f} to {zs.max():+.1f}, median correlation of the VR "
                     f"replications' squared errors across M {v['corr_vr_median']:.2f}")
    zmed = np.median(np.concatenate([np.asarray(v["vr_z"]) for v in d["designs"].values()]))
    if abs(d["mle_z"]) < 1 and abs(zmed) > 1.5:
        verdict = "the shared labelled samples moved the VR numerators, not the MLE denominator"
    elif abs(d["mle_z"]) >= 1 and abs(zmed) > 1.5:
        verdict = "numerators and denominator both moved"
    else:
        verdict = "neither the numerators nor the denominator is beyond noise"
    return ("All M cells share the labelled data (same seed and scenario), so their points are not independent: the "
            f"MLE denominator is one sample (n tr Cov vs tr V: z = {d['mle_z']:+.1f}); " + "; ".join(parts)
            + f": {verdict}.")


# --------------------------------------------------------------------------- F5


def fig_win_rate(fs: FigureSet, formats):
    import matplotlib.pyplot as plt

    summ = fs.summaries["main"]
    scen = list(dict.fromkeys(summ["scenario"]))
    with _style():
        fig, axes = plt.subplots(2, len(scen), figsize=(4.6 * len(scen), 6.2), squeeze=False, sharex=True)
        for j, s in enumerate(scen):
            sub = summ[summ["scenario"] == s]
            ax = axes[0, j]
            for method in ["vr", "vr-auto"]:
                st = method_style(method)
                g = sub[sub["method"] == method].sort_values("n")
                ax.errorbar(g["n"], g["win_mle"] - 0.5, yerr=_err(g["win_mle_se"]), capsize=3, ms=5, **st)
            ax.axhline(0.0, color="#444444", lw=0.8, ls=":")
            ax.set_title(f"{s}: VR policy vs MLE policy", fontsize=10)
            ax.set_ylabel("win rate - 1/2 under p*")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
            ax = axes[1, j]
            for method in ["mle", "vr", "vr-auto"]:
                st = method_style(method)
                g = sub[sub["method"] == method].sort_values("n")
                ax.errorbar(g["n"], g["win_ref"], yerr=_err(g["win_ref_se"]), capsize=3, ms=5, **st)
            opt = fs.data.get("win_star", {}).get(s)
            if opt is not None:
                ax.axhline(opt, color="#2ca02c", lw=1, ls="--", label="pi_theta* (n = infinity)")
            ax.set_title(f"{s}: each policy vs pi_ref", fontsize=10)
            ax.set_ylabel("win rate over pi_ref under p*")
            ax.set_xlabel("labelled pairs n")
            ax.set_xscale("log")
            ns = sorted(set(sub["n"]))
            ax.set_xticks(ns, [str(int(v)) for v in ns])
            ax.minorticks_off()
        axes[0, 0].legend(fontsize=7)
        axes[1, 0].legend(fontsize=7)
        fig.suptitle("Win rates under the true preference p* (95% MC intervals)", fontsize=11)
        fig.tight_layout()
        paths = save_figure(fig, fs.out_dir / "F5_win_rate", formats)
    cap = ("Top: win rate of the VR policy over the BT-MLE policy, E_x sum_ab pi_VR(a|x) pi_MLE(b|x) p*(x,a,b), minus "
           "1/2, vs n (oracle g). Bottom: win rate of each KL-regularised policy (beta = 1) over pi_ref, with the "
           "limit pi_theta* as a dashed line. Means over "
           f"{_reps_text(summ)} replications with 95% intervals; the evaluation set is {fs.configs['main'].n_eval} "
           "fixed contexts per scenario. Sweep `main`.")
    return paths, cap


# --------------------------------------------------------------------------- F6


def fig_coverage(fs: FigureSet, formats):
    import matplotlib.pyplot as plt

    summ = fs.summaries["main"]
    scen = list(dict.fromkeys(summ["scenario"]))
    alpha = fs.configs["main"].alpha
    with _style():
        fig, axes = plt.subplots(1, len(scen), figsize=(4.6 * len(scen), 3.6), squeeze=False, sharey=True)
        for ax, s in zip(axes[0], scen):
            sub = summ[summ["scenario"] == s]
            for j, method in enumerate(["mle", "vr", "vr-auto"]):
                st = method_style(method)
                g = sub[sub["method"] == method].sort_values("n")
                ax.errorbar(g["n"] * (1 + 0.04 * (j - 1)), g["cover_frac"], yerr=_err(g["cover_frac_se"]), capsize=3,
                            ms=5, **st)
            ax.axhline(1 - alpha, color="#444444", lw=1, ls=":", label=f"nominal {1 - alpha:.0%}")
            ax.set_xscale("log")
            ns = sorted(set(sub["n"]))
            ax.set_xticks(ns, [str(int(v)) for v in ns])
            ax.minorticks_off()
            ax.set_xlabel("labelled pairs n")
            ax.set_title(s, fontsize=10)
        axes[0, 0].set_ylabel("coverage of theta* (mean over coordinates)")
        axes[0, 0].legend(fontsize=7)
        fig.suptitle(f"{1 - alpha:.0%} Wald interval coverage (sandwich, clustered by prompt)", fontsize=11)
        fig.tight_layout()
        paths = save_figure(fig, fs.out_dir / "F6_coverage", formats)
    cap = (f"Coverage of the {1 - alpha:.0%} Wald intervals theta_hat_j +- z se_j for the coordinates of theta* (share "
           f"of the d = {fs.configs['main'].d} coordinates covered, averaged over {_reps_text(summ)} replications; 95% "
           "MC intervals), BT-MLE, VR and VR-auto with the oracle g. The full table, including the `kappa` sweep, is "
           "in the report. Sweep `main`.")
    return paths, cap


# --------------------------------------------------------------------------- F7


def fig_lam1_finite_sample(fs: FigureSet, formats):
    import matplotlib.pyplot as plt

    df = fs.data["lam1"]
    cfg = fs.data["lam1_config"]
    gs = list(dict.fromkeys(df["g"]))
    cmap = plt.get_cmap("viridis")
    col = {g: cmap(i / max(len(gs) - 1, 1)) for i, g in enumerate(gs)}
    with _style():
        fig, axes = plt.subplots(1, 3, figsize=(14.5, 4.0))
        floor = 0.5 / cfg.reps  # zero counts drawn at half a replication, open markers, no bar

        def rate(ax, n, p, **kw):
            k = np.round(np.asarray(p) * cfg.reps)
            lo, hi = wilson(k, cfg.reps)
            pos = k > 0
            y = np.where(pos, p, np.nan)  # no line through zero counts: they get open markers at the floor
            err = np.where(pos, [np.nan_to_num(y) - lo, hi - np.nan_to_num(y)], 0.0)
            ax.errorbar(n, y, yerr=err, capsize=2, ms=4, **kw)
            ax.scatter(np.asarray(n)[~pos], np.full((~pos).sum(), floor), facecolor="white",
                       edgecolor=kw.get("color"), zorder=3)

        for g in gs:
            d = df[df["g"] == g].sort_values("n")
            rate(axes[0], d["n"].to_numpy(), d["nc_vr"].to_numpy(), color=col[g], marker="o", lw=1.2, label=g)
            axes[1].plot(d["n"], d["bias_vr_sd"], color=col[g], marker="o", ms=4, lw=1.2, label=g)
            axes[2].plot(d["n"], d["selection_sd"], color=col[g], marker="o", ms=4, lw=1.2, label=g)
        m = df.drop_duplicates("n").sort_values("n")
        rate(axes[0], m["n"].to_numpy(), m["nc_mle"].to_numpy(), color="black", ls="--", marker="D",
             label="BT-MLE (separation)")
        axes[1].plot(m["n"], m["bias_mle_sd"], color="black", ls="--", marker="D", ms=4, label="BT-MLE")
        axes[0].set_yscale("log")
        axes[0].set_ylabel("share of fits without a finite minimiser")
        axes[1].set_ylabel("|mean theta_hat - theta*| / sqrt(tr Cov)  (kept fits)")
        axes[2].set_ylabel("selection shift of the MLE twins (SD units)")
        axes[2].set_yscale("log")
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xticks(list(cfg.ns), [str(v) for v in cfg.ns])
            ax.minorticks_off()
            ax.set_xlabel("labelled pairs n")
        axes[0].set_title("(a) VR at lam = 1: no finite minimiser", fontsize=10)
        axes[1].set_title("(b) bias of the kept fits", fontsize=10)
        axes[2].set_title("(c) bias from leaving fits out", fontsize=10)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"The finite-sample side of lam = 1 ({cfg.scenario}, M = {cfg.M}, {cfg.reps} replications per n)",
                     fontsize=11)
        fig.tight_layout()
        paths = save_figure(fig, fs.out_dir / "F7_lam1_finite_sample", formats)
    cap = (f"VR at lam = 1 in `{cfg.scenario}` (seed {cfg.spec.seed}, scale {cfg.spec.scale:g}, M = {cfg.M}) for "
           f"auxiliary models from best to worst, {cfg.reps} replications per n (every g on the same data). (a) Share "
           "of fits flagged converged = False (objective unbounded below), with 95% Wilson intervals; open markers "
           f"at the bottom: none observed (95% upper bound {wilson(0, cfg.reps)[1]:.1%}). Dashed: the BT-MLE's "
           "separation rate on the same samples. (b) Bias of the "
           "fits that are kept, |mean theta_hat - theta*| (noise of the mean removed) in units of sqrt(tr Cov), "
           "dashed: the MLE on the same samples. (c) What leaving fits out does by "
           "itself: the shift of the MLE twins' mean when the replications whose VR fit failed are dropped, in units "
           "of the MLE's SD (no point: nothing dropped). Study `lam1` (analysis/finite_sample.py).")
    return paths, cap


FIGURES = [
    ("F1", "Regret vs n", fig_regret_vs_n, ("main",)),
    ("F2", "Variance ratio vs misspecification strength", fig_ratio_vs_kappa, ("kappa",)),
    ("F3", "Quality of the auxiliary model g", fig_g_quality, ("gquality",)),
    ("F4", "Extra pairs M and fresh prompts", fig_M_effect, ("M*",)),
    ("F5", "Win rates under p*", fig_win_rate, ("main",)),
    ("F6", "Interval coverage", fig_coverage, ("main",)),
    ("F7", "The finite-sample side of lam = 1", fig_lam1_finite_sample, ()),
]


# --------------------------------------------------------------------------- driver


def build_figure_set(out_dir="paper_figures", *, smoke: bool = False, n_jobs: int = 2, formats=("png", "pdf"),
                     progress: bool = True, fresh: bool = False, n_ctx: int | None = None,
                     only: tuple[str, ...] | None = None) -> FigureSet:
    """Load the data (:func:`analysis.sweeps.load_figure_data`) and draw F1-F7.

    ``n_ctx``: contexts of the theory's sample (default 10000; 2000 for ``smoke``).
    ``only``: restrict to these figure ids (their sweeps only).
    """
    from tqdm.auto import tqdm

    figs = [f for f in FIGURES if only is None or f[0] in only]
    need = None
    if only is not None:
        names = figure_sweeps(smoke, Path(out_dir) / "cache", n_jobs, progress)
        need = set()
        for _, _, _, sw in figs:
            for s in sw:
                need |= {k for k in names if (k == s or (s.endswith("*") and k.startswith(s[:-1])))}
    t0 = time.time()
    fs = load_figure_data(out_dir, smoke=smoke, n_jobs=n_jobs, progress=progress, fresh=fresh, n_ctx=n_ctx,
                          sweeps=need, lam1=only is None or "F7" in only)
    ts = time.time()
    for fid, title, fn, sweeps in tqdm(figs, desc="figures", disable=not progress):
        paths, cap = fn(fs, formats)
        fs.figures.append({"id": fid, "title": title, "paths": paths, "caption": cap, "sweeps": sweeps})
    fs.timings["figures"] = time.time() - ts
    fs.timings["total"] = time.time() - t0
    return fs
