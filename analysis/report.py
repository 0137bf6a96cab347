"""Generate ``paper_figures/REPORT.md`` from a :class:`~analysis.figures.FigureSet`.

Every number in the report is read from the results (simulation summaries, theory,
comparison tables); the prose around them is fixed text with the numbers filled in.
Fragments other commands write to ``paper_figures/sections/*.md`` are included in
the order of :data:`SECTION_ORDER` (then any others, sorted), with a note for each
expected one that is missing.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd

import vrpo
from vrpo_common.fileio import atomic_path
from vrpo_common.stats import Z95

from .compare import CHECKS, Z_FLAG, agreement_summary

MISSPEC_REF = "mixture:1.0"
__all__ = ["write_report", "render_report", "SECTION_ORDER"]

SECTION_ORDER = (
    ("hh_reward.md", "real-data reward model on HH-RLHF (`vrpo hh-reward`, issue 4)"),
    ("llm_policy.md", "LLM policy fine-tuning, DPO vs VRPO (`vrpo policy-demo`, issue 5)"),
)
CHECK_NAMES = {
    "cov": "n tr Cov(theta_hat) vs tr V",
    "regret": "n E[regret] vs tr(G V)/(2 beta)",
    "var_ratio": "variance ratio VR/MLE, simulated vs predicted",
    "regret_ratio": "regret ratio VR/MLE, simulated vs predicted",
    "coverage": "Wald coverage vs nominal",
}


def _f(v, fmt="{:.3f}"):
    return "-" if v is None or not np.isfinite(v) else fmt.format(v)


def _pm(v, se, fmt="{:.3f}"):
    if v is None or not np.isfinite(v):
        return "-"
    return f"{fmt.format(v)} ± {fmt.format(se)}" if se is not None and np.isfinite(se) else fmt.format(v)


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in df.itertuples(index=False):
        lines.append("| " + " | ".join(str(v) for v in r) + " |")
    return "\n".join(lines)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001  (git missing: the report still renders)
        return "unknown"


# --------------------------------------------------------------------------- sections


def _flag_reason(r, table) -> str:
    """A diagnosis of one flagged comparison, from the data."""
    why = []
    if r.nonconverged > 0:
        why.append(f"{int(r.nonconverged)} non-converged fits excluded (unbounded VR objective or separation); the "
                   "retained replications are a selected sample")
    check = r.check
    if check == "coverage":
        over = r.coverage_sim > r.coverage_nominal
        rel_th = r.trV_sandwich / r.trV_th - 1
        txt = (f"{'over' if over else 'under'}-coverage: mean sandwich n tr Cov_hat {r.trV_sandwich:.2f} vs tr V "
               f"{r.trV_th:.2f} ({rel_th:+.0%}) vs simulated n tr Cov {r.ntrcov_sim:.2f} ± {r.ntrcov_sim_se:.2f} "
               f"(z = {r.z_cov:+.1f})")
        if abs(rel_th) < 0.05 and (r.z_cov < -1.5 if over else r.z_cov > 1.5):
            txt += ("; the sandwich estimates tr V correctly, the spread of this set of replications is "
                    f"{'below' if over else 'above'} tr V by chance, so the correct intervals "
                    f"{'over' if over else 'under'}-cover it")
        else:
            txt += f"; the sandwich is {'above' if rel_th > 0 else 'below'} tr V by {abs(rel_th):.0%} at this n"
        why.append(txt)
    else:
        larger = table[(table["scenario"] == r.scenario) & (table["g"] == r.g) & (table["method"] == r.method)
                       & (table["n"] > r.n) & (table["sweep"] == r.sweep)]
        zc = f"z_{check}"
        if len(larger) and np.all(np.abs(larger[zc]) <= Z_FLAG):
            why.append(f"agrees at larger n ({', '.join(str(int(v)) for v in larger['n'])}): finite-sample bias")
        sim_col = {"cov": "ntrcov_sim", "regret": "nregret_sim", "var_ratio": "var_ratio_sim",
                   "regret_ratio": "regret_ratio_sim"}[check]
        th_col = {"cov": "trV_th", "regret": "regret_const_th", "var_ratio": "var_ratio_th",
                  "regret_ratio": "regret_ratio_th"}[check]
        rel = getattr(r, sim_col) / getattr(r, th_col) - 1
        why.append(f"simulation {'above' if rel > 0 else 'below'} theory by {abs(rel):.1%}")
    return "; ".join(why)


def _agreement_section(fs) -> list[str]:
    comp = fs.compare
    n_min = 0 if fs.smoke else 1000
    out = ["## 2. Theory vs simulation", ""]
    out.append(f"Each cell compares a Monte Carlo estimate (mean over replications, with its standard error) with the "
               f"population theory (with the jackknife standard error of its context sample) and flags a difference "
               f"of more than {Z_FLAG:g} combined standard errors. Ratios VR/MLE are computed on paired replications "
               "(common random numbers). Coverage is compared with its nominal level. Theory is evaluated at the "
               "simulation's own theta*; G on its evaluation contexts.")
    out.append("")
    agg = agreement_summary(comp, n_min=n_min)
    agg_all = agreement_summary(comp, n_min=0)
    t = pd.DataFrame({
        "check": [CHECK_NAMES[c] for c in agg["check"]],
        f"cells (n >= {n_min})": agg["cells"], f"within {Z_FLAG:g} SE": agg["within"],
        "share": [f"{v:.1%}" for v in agg["share"]],
        "all n: within / cells": [f"{w} / {c}" for w, c in zip(agg_all["within"], agg_all["cells"])],
    })
    out += [_md_table(t), ""]
    core = agg[agg["check"].isin(["cov", "regret", "var_ratio", "regret_ratio"])]
    tot_c, tot_w = int(core["cells"].sum()), int(core["within"].sum())
    out.append(f"Over the four theory checks at n >= {n_min}: **{tot_w} of {tot_c} comparisons ({tot_w / max(tot_c, 1):.1%}) "
               f"agree within {Z_FLAG:g} SE** (target: at least 90%).")
    out.append("")
    flagged = []
    for c in CHECKS:
        if f"flag_{c}" not in comp:
            continue
        sub = comp[(comp["n"] >= n_min) & comp[f"flag_{c}"].fillna(False).astype(bool)].copy()
        sub["check"] = c
        flagged.append(sub)
    flagged = pd.concat(flagged, ignore_index=True) if flagged else pd.DataFrame()
    if len(flagged):
        out.append(f"Flagged comparisons at n >= {n_min} and the diagnosis read off the data:")
        out.append("")
        ft = pd.DataFrame({
            "sweep": flagged["sweep"], "scenario": flagged["scenario"], "g": flagged["g"],
            "method": flagged["method"], "n": flagged["n"], "check": flagged["check"],
            "z": [_f(getattr(r, f"z_{r.check}"), "{:+.2f}") for r in flagged.itertuples()],
            "why": [_flag_reason(r, comp) for r in flagged.itertuples()],
        })
        out += [_md_table(ft), ""]
    else:
        out += [f"No comparison at n >= {n_min} is flagged.", ""]
    n_exp = (agg["cells"].sum()) * 0.0027
    out.append("The comparisons are not independent: sweeps with the same scenario string, n and seed share their "
               "labelled data (common random numbers; e.g. the MLE rows of `main`, `gquality` and every `M<M>-*` sweep at "
               "n = 1000 use the same first 200 data sets), so one Monte Carlo fluctuation can move several cells together "
               "(visible in F4, where all M share the MLE sample).")
    out.append("")
    out.append(f"For reference, with exactly normal errors about {n_exp:.1f} of these comparisons would exceed "
               f"{Z_FLAG:g} SE by chance. The SE of n tr Cov is a delta-method SE of a variance (heavy-tailed when "
               "samples are nearly separable), so it is least reliable in the sharp-label `bt` cells at small n, "
               "where n tr Cov exceeds tr V (finite-sample bias of the MLE); those cells are below n = 1000.")
    out.append("")
    # condensed full table
    show = comp.sort_values(["sweep", "scenario", "g", "method", "n"])
    full = pd.DataFrame({
        "sweep": show["sweep"], "scenario": show["scenario"], "g": show["g"], "method": show["method"],
        "n": show["n"], "reps": show["reps"], "n.c.": show["nonconverged"],
        "n tr Cov (sim)": [_pm(a, b, "{:.2f}") for a, b in zip(show["ntrcov_sim"], show["ntrcov_sim_se"])],
        "tr V": [_f(v, "{:.2f}") for v in show["trV_th"]],
        "z": [_f(v, "{:+.1f}") for v in show["z_cov"]],
        "n E regret (sim)": [_pm(a, b, "{:.3f}") for a, b in zip(show["nregret_sim"], show["nregret_sim_se"])],
        "tr(GV)/2b": [_f(v, "{:.3f}") for v in show["regret_const_th"]],
        "z ": [_f(v, "{:+.1f}") for v in show["z_regret"]],
        "var ratio (sim)": [_pm(a, b) for a, b in zip(show.get("var_ratio_sim", np.nan), show.get("var_ratio_sim_se", np.nan))],
        "var ratio (th)": [_f(v) for v in show.get("var_ratio_th", np.nan)],
        "regret ratio (sim)": [_pm(a, b) for a, b in zip(show.get("regret_ratio_sim", np.nan),
                                                       show.get("regret_ratio_sim_se", np.nan))],
        "regret ratio (th)": [_f(v) for v in show.get("regret_ratio_th", np.nan)],
        "coverage": [_pm(a, b) for a, b in zip(show["coverage_sim"], show["coverage_sim_se"])],
        "lam (sim)": [_f(v, "{:.2f}") for v in show["lam_sim"]],
        "lam (th)": [_f(v, "{:.2f}") for v in show["lam_th"]],
        "flag": ["⚑" if any(bool(getattr(r, f"flag_{c}", False)) is True and np.isfinite(getattr(r, f"z_{c}", np.nan))
                            for c in CHECKS[:4]) else "" for r in show.itertuples()],
    })
    out += ["<details><summary>Full theory-vs-simulation table (every sweep, scenario, g, method, n)</summary>", "",
            _md_table(full), "", "</details>", ""]
    return out


def _reference_section(fs) -> list[str]:
    if "reference" not in fs.tables:
        return []
    t = fs.tables["reference"]
    cfg = fs.configs["reference"]
    mle = t[t["method"] == "mle"].iloc[0]
    vr = t[t["method"] == "vr"].iloc[0]
    out = ["### METHOD.md section 6 reference numbers", ""]
    out.append(f"METHOD.md reports, for a slightly different bandit (d = 4, K = 8, uniform pi_ref, beta = 1, mixture at "
               "scale 10, M = 4, oracle g, n = 1000, 400 replications), tr V_MLE = 100.0, tr V_VR = 86.8 (ratio 0.87), "
               "simulated n tr Cov 106.6 and 93.8, n E[regret] 5.11 ± 0.19 (MLE) and 4.46 ± 0.16 (VR) against theory "
               f"4.87 and 4.23. Our sweep `reference` (`{cfg.scenarios[0]}`, scale {cfg.scale:g}, seed {cfg.seed}, "
               f"{int(mle['reps'])} replications) gives:")
    out.append("")
    tab = pd.DataFrame({
        "quantity": ["tr V (theory)", "n tr Cov (simulated)", "tr(GV)/(2 beta) (theory)", "n E[regret] (simulated)"],
        "BT-MLE": [_f(mle["trV_th"], "{:.2f}"), _pm(mle["ntrcov_sim"], mle["ntrcov_sim_se"], "{:.2f}"),
                   _f(mle["regret_const_th"]), _pm(mle["nregret_sim"], mle["nregret_sim_se"])],
        "VR (lam = 1)": [_f(vr["trV_th"], "{:.2f}"), _pm(vr["ntrcov_sim"], vr["ntrcov_sim_se"], "{:.2f}"),
                         _f(vr["regret_const_th"]), _pm(vr["nregret_sim"], vr["nregret_sim_se"])],
        "ratio VR/MLE": [_f(vr["var_ratio_th"]), _pm(vr["var_ratio_sim"], vr["var_ratio_sim_se"]),
                         _f(vr["regret_ratio_th"]), _pm(vr["regret_ratio_sim"], vr["regret_ratio_sim_se"])],
    })
    out += [_md_table(tab), ""]
    out.append(f"The variance ratio ({_f(vr['var_ratio_th'])} predicted) is of the same size as METHOD.md's 0.87; the "
               "absolute levels differ because the scenario's construction (annotator types, feature law) is not the "
               "one behind METHOD.md's numbers, so tr V itself is not comparable. No tuning was done to match.")
    out.append("")
    return out


def _precision_section(fs) -> list[str]:
    if "precision" not in fs.tables:
        return []
    t = fs.tables["precision"]
    cfg = fs.configs["precision"]
    mle = t[t["method"] == "mle"].iloc[0]
    vr = t[t["method"] == "vr"].iloc[0]
    return ["### High-replication check", "",
            f"An independent instance (sweep `precision`: seed {cfg.seed}, so a different bandit and data, "
            f"`{cfg.scenarios[0]}`, n = {cfg.n[0]}, {int(mle['reps'])} replications, oracle g, M = {cfg.M}) pins the "
            f"variance ratio down: simulated {_pm(vr['var_ratio_sim'], vr['var_ratio_sim_se'])} against the predicted "
            f"{_f(vr['var_ratio_th'])} ± {_f(vr['var_ratio_th_se'], '{:.4f}')}; n tr Cov {_pm(mle['ntrcov_sim'], mle['ntrcov_sim_se'], '{:.2f}')} "
            f"(MLE) and {_pm(vr['ntrcov_sim'], vr['ntrcov_sim_se'], '{:.2f}')} (VR) against tr V = {_f(mle['trV_th'], '{:.2f}')} "
            f"and {_f(vr['trV_th'], '{:.2f}')}; n E[regret] {_pm(mle['nregret_sim'], mle['nregret_sim_se'])} and "
            f"{_pm(vr['nregret_sim'], vr['nregret_sim_se'])} against {_f(mle['regret_const_th'])} and "
            f"{_f(vr['regret_const_th'])}. The ratio agrees to within its standard error; the levels sit "
            f"{_f(100 * (mle['ntrcov_sim'] / mle['trV_th'] - 1), '{:.0f}')}% (MLE) and "
            f"{_f(100 * (vr['ntrcov_sim'] / vr['trV_th'] - 1), '{:.0f}')}% (VR) above tr V (z = {_f(mle['z_cov'], '{:+.1f}')} "
            f"and {_f(vr['z_cov'], '{:+.1f}')}), consistent with a common O(1/n) finite-sample excess that cancels in "
            "the ratio, though not resolved at this replication count.", ""]


def _coverage_section(fs) -> list[str]:
    comp = fs.compare
    out = ["### Coverage of the 95% Wald intervals (F6)", ""]
    sub = comp[comp["sweep"].isin(["main"])].sort_values(["scenario", "n"])
    piv = {}
    for r in sub.itertuples(index=False):
        piv.setdefault((r.scenario, r.n), {})[r.method] = _pm(r.coverage_sim, r.coverage_sim_se)
    rows = [{"scenario": s, "n": n, **{m: v.get(m, "-") for m in ["mle", "vr", "vr-auto"]}} for (s, n), v in piv.items()]
    out += [_md_table(pd.DataFrame(rows).rename(columns={"mle": "BT-MLE", "vr": "VR", "vr-auto": "VR-auto"})), ""]
    k = comp[comp["sweep"] == "kappa"]
    if len(k):
        lo = k.groupby("method")["coverage_sim"].agg(["min", "median", "max"])
        out.append("Across the `kappa` sweep (every zoo scenario, n = " + ", ".join(str(int(v)) for v in sorted(set(k["n"])))
                   + "): " + "; ".join(f"{m}: coverage {_f(r['min'])}-{_f(r['max'])} (median {_f(r['median'])})"
                                       for m, r in lo.iterrows()) + ".")
        out.append("")
    return out


def _findings(fs) -> list[str]:
    comp = fs.compare
    out = ["## 1. Findings", ""]
    # where VR helps most
    k = comp[(comp["sweep"] == "kappa") & (comp["method"] == "vr")].sort_values("var_ratio_th")
    ref_txt = ""
    if "reference" in fs.tables:
        rr = fs.tables["reference"]
        rr = rr[rr["method"] == "vr"].iloc[0]
        ref_txt = (f" (`{MISSPEC_REF}` at scale {fs.configs['reference'].scale:g} instead of "
                   f"{fs.configs['kappa'].scale:g}: predicted ratio {_f(rr['var_ratio_th'])})")
    mono_txt = ""
    if len(k):
        fam = k.assign(family=k["scenario"].str.split(":").str[0]).sort_values("kappa")
        inc, non = [], []
        for f_, grp in fam.groupby("family", sort=False):
            r_ = np.concatenate([[1.0], grp["var_ratio_th"].to_numpy()])
            (inc if np.all(np.diff(r_) <= 1e-9) else non).append(f_)
        mono_txt = (f"The predicted gain grows with kappa in {', '.join(f'`{f_}`' for f_ in sorted(inc))}"
                    + (f", but not monotonically in {', '.join(f'`{f_}`' for f_ in sorted(non))} (F2): stronger "
                       "misspecification also moves theta* and the label noise, not only the residual m."
                       if non else "."))
    if len(k):
        best = k.head(3)
        out.append("- **Where VR helps most.** The largest predicted variance reductions (lam = 1, oracle g, M = "
                   f"{fs.configs['kappa'].M}, same prompts) are in "
                   + "; ".join(f"`{r.scenario}` (predicted ratio {_f(r.var_ratio_th)}, simulated "
                               f"{_pm(r.var_ratio_sim, r.var_ratio_sim_se)})" for r in best.itertuples())
                   + ". " + mono_txt + " Gains also grow with sharper labels" + ref_txt + ".")
        none = k[k["var_ratio_th"] > 0.98]
        out.append("- **Where it does nothing.** Under BT (`bt`, predicted ratio exactly 1; simulated "
                   + ", ".join(_pm(r.var_ratio_sim, r.var_ratio_sim_se) for r in comp[(comp["sweep"] == "main")
                               & (comp["scenario"] == "bt") & (comp["method"] == "vr") & (comp["n"] >= 1000)].itertuples())
                   + " at n >= 1000) and, within 2%, in "
                   + (", ".join(f"`{s}`" for s in none["scenario"]) if len(none) else "no other cell of the zoo")
                   + ". The gain is the within-prompt misspecification variance (1 - 1/M) E_x Var(m|x); when BT "
                   "holds, m = 0.")
    fresh = comp[comp["sweep"].str.endswith("-fresh") & (comp["method"] == "vr")]
    same = comp[comp["sweep"].str.endswith("-same") & (comp["method"] == "vr")]
    if len(fresh) and len(same):
        Mx = int(max(fresh["M"]))
        f_, s_ = fresh[fresh["M"] == Mx].iloc[0], same[same["M"] == Mx].iloc[0]
        f1 = fresh[fresh["M"] == min(fresh["M"])].iloc[0]
        out.append(f"- **M and fresh prompts (F4).** At M = {Mx} the predicted ratio is {_f(s_.var_ratio_th)} with "
                   f"shared prompts and {_f(f_.var_ratio_th)} with fresh prompts (simulated "
                   f"{_pm(s_.var_ratio_sim, s_.var_ratio_sim_se)} and {_pm(f_.var_ratio_sim, f_.var_ratio_sim_se)}). "
                   f"With M = {int(f1.M)}, lam = 1 gives a predicted ratio of {_f(f1.var_ratio_th)} with fresh and "
                   f"{_f(same[same['M'] == f1.M].iloc[0].var_ratio_th)} with shared prompts: one unlabelled pair adds "
                   "as much variance as it removes (the optimal lam is then 1/2, VR-auto's ratio "
                   f"{_f(comp[comp['sweep'].str.endswith('-fresh') & (comp['method'] == 'vr-auto') & (comp['M'] == f1.M)]['var_ratio_th'].iloc[0])}"
                   ").")
    g = comp[(comp["sweep"] == "gquality")]
    if len(g):
        vr = g[g["method"] == "vr"].set_index("g")
        au = g[g["method"] == "vr-auto"].set_index("g")
        hurt = vr[vr["var_ratio_th"] > 1.0]
        out.append("- **Where lam = 1 hurts.** With a poor g the VR estimator with lam = 1 is worse than the MLE: "
                   + "; ".join(f"`{gg}` predicted {_f(r.var_ratio_th)}, simulated {_pm(r.var_ratio_sim, r.var_ratio_sim_se)}"
                               for gg, r in hurt.iterrows())
                   + f" (`{fs.configs['gquality'].scenarios[0]}`, n = {fs.configs['gquality'].n[0]}). The power-tuned "
                   "lam avoids this: "
                   + "; ".join(f"`{gg}` lam = {_f(au.loc[gg, 'lam_sim'], '{:.2f}')} (optimum "
                               f"{_f(au.loc[gg, 'lam_th'], '{:.2f}')}), ratio {_pm(au.loc[gg, 'var_ratio_sim'], au.loc[gg, 'var_ratio_sim_se'])}"
                               for gg in hurt.index if gg in au.index) + ".")
        nc = int(g[g["method"] == "vr"]["nonconverged"].sum())
        nc_all = int(comp[comp["method"] == "vr"]["nonconverged"].sum())
        n_vr = int(comp[comp["method"] == "vr"][["reps", "nonconverged"]].sum().sum())
        out.append(f"- **Unbounded objective at lam = 1.** With a poor g the finite-sample VR objective at lam = 1 can "
                   "be unbounded below; `fit_bt` then flags the fit converged = False, and every summary excludes it and "
                   f"counts it (`n.c.` in the tables). In these sweeps (n >= {int(comp['n'].min())}) this happened in "
                   f"{nc} of the lam = 1 fits of the `gquality` sweep and {nc_all} of all {n_vr} lam = 1 fits; VR-auto: "
                   f"{int(comp[comp['method'] == 'vr-auto']['nonconverged'].sum())}; BT-MLE: "
                   f"{int(comp[comp['method'] == 'mle']['nonconverged'].sum())} (separation).")
        if "self" in vr.index:
            md = fs.data.get("self_maxdiff")
            out.append("- **The `self` auxiliary model (the reference code's default) does not help at all.** Its "
                       "predicted ratio is exactly "
                       f"{_f(vr.loc['self', 'var_ratio_th'], '{:.4f}')} and its fits equal the MLE's to "
                       f"{_f(md, '{:.1e}')} (largest coordinate difference over all replications): the MLE solves the VR "
                       "estimating equation when g is the MLE's own sigma(theta_hat . X), so VR with `self` g is the "
                       "MLE for every lam. (Its correction term has no variance, so VR-auto reports lam = 0 "
                       f"(mean {_f(fs.data.get('self_auto_lam'), '{:.2f}')} here).)")
        if "learned:5" in vr.index:
            r = vr.loc["learned:5"]
            out.append(f"- **A learned g (`learned:5`)** gives a predicted ratio {_f(r.var_ratio_th)} (simulated "
                       f"{_pm(r.var_ratio_sim, r.var_ratio_sim_se)}): its quadratic feature class barely improves on the "
                       f"BT fit itself in `{fs.configs['gquality'].scenarios[0]}`, so its limit behaves almost like "
                       "`self`. The theory uses that limit; at this n the cross-fitted g carries estimation noise of "
                       "the same order as its tiny signal, so lam = 1 slightly hurts and VR-auto picks lam = "
                       f"{_f(au.loc['learned:5', 'lam_sim'], '{:.2f}')} instead of the limit's optimum "
                       f"{_f(au.loc['learned:5', 'lam_th'], '{:.2f}')}.")
    if "main" in fs.summaries:
        sm = fs.summaries["main"]
        w = sm[sm["method"] != "mle"]
        dev = (w["win_mle"] - 0.5)
        pos = int(((dev - Z95 * w["win_mle_se"]) > 0).sum())
        neg = int(((dev + Z95 * w["win_mle_se"]) < 0).sum())
        out.append(f"- **Win rate under p* (F5).** The VR policies' win rate over the MLE policy differs from 1/2 by at "
                   f"most {_f(dev.abs().max(), '{:.1e}')} (all n, both scenarios); {pos} of {len(w)} cells are "
                   f"significantly above 1/2 and {neg} significantly below (95%). A 15% lower parameter variance "
                   "translates into a negligible change in head-to-head preference: both policies fluctuate around the "
                   "same pi_theta*, so the first-order term of the win rate averages out and only O(1/n) differences "
                   "remain (the same order as the regret difference).")
    m = comp[(comp["sweep"] == "main") & (comp["n"] >= 1000)]
    if len(m):
        out.append("- **Coverage.** At n >= 1000 in sweep `main` the 95% Wald intervals cover theta* in "
                   + "; ".join(f"{meth}: {_f(m[m.method == meth]['coverage_sim'].min())}-"
                               f"{_f(m[m.method == meth]['coverage_sim'].max())}" for meth in ["mle", "vr", "vr-auto"])
                   + " of coordinates (see the coverage table).")
    out.append("")
    return out


def _figures_section(fs) -> list[str]:
    out = ["## 3. Figures", ""]
    for f in fs.figures:
        png = [p for p in f["paths"] if str(p).endswith(".png")]
        rel = os.path.relpath(png[0], fs.out_dir) if png else None
        out.append(f"### {f['id']}. {f['title']}")
        out.append("")
        if rel:
            out.append(f"![{f['id']}]({rel})")
            out.append("")
        out.append(f"*{f['id']}.* {f['caption']}")
        out.append("")
    return out


def _sections_slot(out_dir: Path) -> list[str]:
    sec = out_dir / "sections"
    out = ["## 4. Real-data and LLM results", ""]
    known = [name for name, _ in SECTION_ORDER]
    for name, what in SECTION_ORDER:
        f = sec / name
        if f.exists():
            out += [f.read_text().rstrip(), ""]
        else:
            out += [f"> *Missing:* `sections/{name}` ({what}) has not been generated yet; run its command to fill "
                    "this slot.", ""]
    if sec.exists():
        for f in sorted(sec.glob("*.md")):
            if f.name not in known:
                out += [f.read_text().rstrip(), ""]
    return out


def _config_section(fs) -> list[str]:
    out = ["## 5. Configurations", "",
           "Every sweep is one `ExperimentConfig`; its resolved form is embedded in its results file "
           "(`cache/<sweep>.parquet`, schema metadata `vrpo_config`). Result-changing fields:", ""]
    for name, cfg in fs.configs.items():
        ident = cfg.identity()
        meta = fs.metas.get(name, {})
        el = meta.get("elapsed_s")
        out.append(f"- `{name}` (seed {cfg.seed}; run time {_f(el, '{:.0f}')} s): `{json.dumps(ident, sort_keys=True)}`")
    out.append("")
    th = next(iter(next(iter(fs.theories.values())).values()))
    out.append(f"Theory: {th.n_ctx} contexts per scenario in {th.n_batches} batches (jackknife SEs), seeded by the "
               "bandit seed and the scenario name; sums over arm pairs exact; `noisy:s` integrated by Gauss-Hermite "
               "quadrature over its logit noise; `self` and `learned` at their limits (see `docs/theory.md`).")
    out.append("")
    return out


def render_report(fs) -> str:
    """The report's markdown text."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    tm = fs.timings
    head = ["# Theory checks and paper figures", "",
            f"*Generated by `vrpo figures` ({'smoke configuration, ' if fs.smoke else ''}vrpo {vrpo.__version__}, "
            f"commit {_git_commit()}, {now}). Do not edit: rerun the command. Sweeps and theory "
            f"{'read from cache' if fs.data.get('all_cached') else 'computed'} in {_f(tm.get('sweeps_and_theory'), '{:.0f}')} s, "
            f"figures drawn in {_f(tm.get('figures'), '{:.0f}')} s.*", ""]
    if fs.smoke:
        head += ["> **Smoke configuration**: few replications; numbers are not meaningful.", ""]
    body = (_findings(fs) + _agreement_section(fs) + _reference_section(fs) + _precision_section(fs) + _coverage_section(fs)
            + _figures_section(fs) + _sections_slot(fs.out_dir) + _config_section(fs))
    return "\n".join(head + body).rstrip() + "\n"


def write_report(fs, path=None) -> Path:
    """Write the report atomically to ``path`` (default ``<out_dir>/REPORT.md``)."""
    path = Path(path) if path else Path(fs.out_dir) / "REPORT.md"
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write(render_report(fs))
    return path
