"""Generate ``paper_figures/REPORT.md`` from a :class:`~analysis.figures.FigureSet`.

Every sentence that states a number or a direction is computed from the results:
simulation summaries, theory, comparison tables, the ``lam = 1`` study, and the summary
lines embedded in the fragments other commands write to ``paper_figures/sections/``
(``vrpo validate`` -> ``validation.md``, ``vrpo hh-reward`` -> ``hh_reward.md``, ...).
Fixed prose only describes procedures or restates docs/method.md's theory. Words such as
"above"/"below", "helps"/"hurts" are chosen by comparing numbers (:func:`_word`).

The report also carries the README's findings block (between ``README_START`` and
``README_END``); ``tests/test_figures.py`` checks that ``README.md`` quotes it verbatim.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

import vrpo
from vrpo_common.fileio import atomic_path
from vrpo_common.report import git_commit, md_table
from vrpo_common.stats import Z95, holm_threshold, p_two_sided

from .compare import CHECKS, Z_FLAG, agreement_summary, holm_table, shared_data_groups
from .sweeps import MISSPEC
from .validate_report import read_summary

MISSPEC_REF = MISSPEC  # the reference misspecified scenario (F1, F3, F5)
ALPHA_FIG = 1e-3  # family-wise level of the figure-sweep comparisons (Holm)
__all__ = ["write_report", "render_report", "readme_block", "SECTION_ORDER", "README_START", "README_END"]

SECTION_ORDER = (
    ("hh_reward.md", "real-data reward model on HH-RLHF (`vrpo hh-reward --publish`)"),
    ("llm_policy.md", "LLM policy fine-tuning, DPO vs VRPO (`vrpo policy-demo --publish`)"),
    ("llm_regret.md", "regret curves on a language model with a known gold preference (`vrpo llm-regret --publish`)"),
)
VALIDATION_SECTION = ("validation.md", "independent high-power checks and mutation tests (`vrpo validate --default "
                      "--fragment paper_figures/sections/validation.md`)")
README_START = "<!-- readme-findings:start -->"
README_END = "<!-- readme-findings:end -->"
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


def _word(x, pos, neg, zero="", tol=0.0):
    """``pos`` if ``x > tol``, ``neg`` if ``x < -tol``, else ``zero`` (directions are computed, never typed)."""
    return pos if x > tol else (neg if x < -tol else zero)


def _fragment(out_dir: Path, name: str) -> str | None:
    f = Path(out_dir) / "sections" / name
    return f.read_text() if f.exists() else None


def _policy_numbers(text: str | None) -> dict | None:
    """Gradient-variance ratios and the accuracy difference from the policy-demo fragment's table
    (``| gradient variance VRPO / DPO at <where> (...) | <ratio> [lo, hi] |``); None if absent."""
    if not text:
        return None
    grad = dict(re.findall(r"\| gradient variance VRPO / DPO at ([a-z ]+?) \(tr Cov[^|]*\| ([0-9.]+) \[", text))
    acc = re.search(r"\| accuracy difference VRPO - DPO \(paired\) \| ([-0-9.]+) \[([-0-9.]+), ([-0-9.]+)\]", text)
    if not grad or not acc:
        return None
    return {"grad": {k: float(v) for k, v in grad.items()}, "acc": tuple(float(v) for v in acc.groups())}


# --------------------------------------------------------------------------- numbers shared by findings and README


def _numbers(fs, val, hh) -> dict:
    """Every number the findings and the README block quote, computed once."""
    comp = fs.compare
    N = {}
    k = comp[(comp["sweep"] == "kappa") & (comp["method"] == "vr")].copy()
    if len(k):
        k["family"] = k["scenario"].str.split(":").str[0]
        N["kappa"] = k.sort_values("var_ratio_th")
        N["none"] = k[np.abs(k["var_ratio_th"] - 1) < 0.02]
        mix = k[k["scenario"].isin([MISSPEC_REF, "mixture:1"])]
        N["mixture_gain"] = 1 - float(mix["var_ratio_th"].iloc[0]) if len(mix) else None
    m = comp[(comp["sweep"] == "main") & (comp["method"] == "vr")]
    N["bt_sim"] = m[(m["scenario"] == "bt") & (m["n"] >= 1000)]
    N["bt_th"] = m[m["scenario"] == "bt"]["var_ratio_th"]
    g = comp[comp["sweep"] == "gquality"]
    if len(g):
        vr, au = g[g["method"] == "vr"].set_index("g"), g[g["method"] == "vr-auto"].set_index("g")
        N["hurt"] = vr[vr["var_ratio_th"] > 1.0]
        N["auto"] = au
        worst = au.loc[au["var_ratio_sim"].idxmax()] if len(au) else None
        N["auto_worst"] = worst
    lam1 = fs.data.get("lam1")
    if lam1 is not None and len(lam1):
        N["lam1"] = lam1
    N["self_g"] = fs.data.get("self_g")
    N["val"] = val
    N["hh"] = hh
    return N


def _gain_bullet(N) -> str | None:
    if "kappa" not in N:
        return None
    k = N["kappa"]
    best = k.head(2)
    none = sorted(f for f, g in k.groupby("family") if np.all(np.abs(g["var_ratio_th"] - 1) < 0.02))
    bt = N["bt_th"]
    bt_txt = f"ratio {_f(float(bt.iloc[0]), '{:.3f}')}" if len(bt) else "ratio 1"
    return ("VR's gain is the within-prompt misspecification variance `(1 - 1/M) E_x Var(m | x)` (docs/method.md s3): "
            f"none under BT ({bt_txt} predicted), {_f(100 * N['mixture_gain'], '{:.0f}')}% in the two-annotator "
            "mixture, up to " + " and ".join(f"{_f(100 * (1 - r.var_ratio_th), '{:.0f}')}% in `{r.scenario}`"
                                              for r in best.itertuples())
            + (f"; within 2% of nothing for {', '.join(none)} at every strength tested" if none else "")
            + " (oracle g, M = 4, n = 1000).")


def _prompt_bullet(N) -> str | None:
    val = N["val"]
    if not val or not val.get("designs"):
        return None
    d = val["designs"]
    same = {k.split("|")[0]: v for k, v in d.items() if k.endswith("|same")}
    fresh = {k.split("|")[0]: v for k, v in d.items() if k.endswith("|fresh")}
    both = [s for s in same if s in fresh]
    if not both:
        return None
    s = max(both, key=lambda k: abs(same[k]["sim_median"] - fresh[k]["sim_median"]))  # the clearest case
    a, b = same[s], fresh[s]
    return (f"When the annotator type is set by the prompt (`{s}`), extra pairs on the labelled prompt remove "
            f"{_word(a['sim_median'] - b['sim_median'], 'less', 'more', 'as much')} variance than pairs on fresh "
            f"prompts: VR/MLE variance ratio {a['sim_median']:.3f} vs {b['sim_median']:.3f} simulated (median over "
            f"{a['instances']} instances; predicted {a['pred_median']:.3f} vs {b['pred_median']:.3f}): the "
            "between-prompt term `Var_x E[m|x]` stays with shared prompts.")


def _hurt_bullet(N) -> str | None:
    if "hurt" not in N:
        return None
    hurt = N["hurt"]
    if not len(hurt):
        return "With lam = 1 no auxiliary model of the ladder made VR worse than the MLE (predicted)."
    w = N["auto_worst"]
    txt = (f"With lam = 1 a poor g makes things worse: up to {hurt['var_ratio_sim'].max():.1f}x the MLE's variance "
           f"(simulated, `{hurt['var_ratio_sim'].idxmax()}`) in `{MISSPEC_REF}`. ")
    if w is not None:
        z = (w["var_ratio_sim"] - 1) / w["var_ratio_sim_se"]
        txt += (f"Power-tuned lam is {_word(z - 2, 'measurably', 'never measurably')} worse than the MLE "
                f"(worst ratio {_pm(w['var_ratio_sim'], w['var_ratio_sim_se'])}, `{w.name}`).")
    return txt


def _lam1_bullet(N) -> str | None:
    if "lam1" not in N:
        return None
    d = N["lam1"]
    n0 = int(d["n"].min())
    at0 = d[d["n"] == n0]
    big = d[d["n"] >= 100]
    ok = d.dropna(subset=["selection_sd"])
    return (f"In finite samples the lam = 1 objective can have no minimiser (flagged, never silent): at n = {n0} in "
            f"{100 * at0['nc_vr'].min():.0f}-{100 * at0['nc_vr'].max():.0f}% of fits depending on g (BT-MLE separation "
            f"{100 * at0['nc_mle'].iloc[0]:.0f}%), at most {100 * big['nc_vr'].max():.1f}% from n = 100; leaving them out "
            f"shifts the estimate by at most {ok['selection_sd'].max():.2f} SD (F7).")


def _self_bullet(N) -> str | None:
    sg = N["self_g"]
    if not sg:
        return None
    return ("The reference code's default `self` auxiliary model (the policy's own implied preference) cannot help: "
            "the MLE solves the VR estimating equation, so VR with `self` g *is* the MLE (minimised from theta = 0 by "
            f"an independent solver: equal to {sg['max_diff']:.0e}; a perturbed g moves it by {sg['control_diff']:.0e}).")


def _validation_bullet(N) -> str | None:
    v = N["val"]
    if not v:
        return None
    kz = [m["max_abs_z"] for m in v["mutants"].values()]
    return (f"`vrpo validate` ({v['mode']} mode, {v['instances']} bandit instances, >= {v['min_reps']} replications "
            f"per cell): {v['mutants_killed']} of {v['mutants_total']} deliberately wrong theories and sandwiches "
            f"rejected (each mutant's largest effect between {min(kz):.1f} and {max(kz):.1f} SE); "
            f"the correct theory passes {v['theory_checks'] - v['theory_rejected']} of {v['theory_checks']} checks "
            f"after Holm at family-wise {v['holm_alpha']:g} ({v['theory_flagged']} beyond 3 SE, "
            f"{v['expected_flagged']:.2f} expected by chance).")


def _hh_bullet(N) -> str | None:
    h = N["hh"]
    if not h or "llm_vr_ratio_median" not in h:
        return None
    txt = (f"On real HH data the GPT-3.5 annotator at lam = 1 {_word(h['llm_vr_ratio_median'] - 1, 'inflates', 'reduces')} "
           f"the variance of the reward estimate (median {h['llm_vr_ratio_median']:.2f}x); VR-auto turns it into "
           f"{_word(1 - h['llm_auto_ratio_median'], 'a small, consistent gain', 'no gain')} (median "
           f"{h['llm_auto_ratio_median']:.2f}x).")
    if "bias_vr_over_mle" in h:
        txt += (f" Its lam = 1 estimates miss the same-target bound because their finite-sample bias is "
                f"{h['bias_vr_over_mle']:.1f}x the MLE's at n = {h['bias_n']}; {h['bias_cut_pct']:.0f}% of it goes when "
                f"the auxiliary pairs grow from {h['bias_N0']} to {h['bias_Nmax']}"
                + (f", and the n, N -> infinity limit is consistent with theta* (p >= {h['limit_p_min']:.2f})"
                   if "limit_p_min" in h else "") + ".")
    return txt


def _policy_bullet(N, fs) -> str | None:
    pol = _policy_numbers(_fragment(fs.out_dir, "llm_policy.md"))
    if not pol:
        return None
    trained = {k: v for k, v in pol["grad"].items() if "trained" in k}
    if not trained:
        return None
    lo, hi = min(trained.values()), max(trained.values())
    a, alo, ahi = pol["acc"]
    return (f"In the tiny-LM demo VRPO (lam = 1, a weak TF-IDF g) had {lo:.1f}-{hi:.1f}x DPO's minibatch-gradient "
            f"variance at trained parameters; the held-out accuracy difference VRPO - DPO was {a:+.3f} [{alo:+.3f}, "
            f"{ahi:+.3f}]" + (" (interval covers 0)." if alo <= 0 <= ahi else "."))


def _llm_regret_bullet(fs) -> str | None:
    """The language-model testbed's headline, from the summary ``vrpo llm-regret`` embeds in its section."""
    text = _fragment(fs.out_dir, "llm_regret.md")
    if not text:
        return None
    tag = "<!-- vrpo-llm-regret-summary: "
    i = text.find(tag)
    if i < 0:
        return None
    s = json.loads(text[i + len(tag):text.index(" -->", i)])
    var = s["variants"]
    if not var:
        return None
    Mmax = max(v["M"] for v in var)
    name = {"vrpo": "lam = 1", "vrpo-auto": "lam = auto"}
    parts = []
    for k in sorted({v["kappa"] for v in var}):
        vs = [v for v in var if v["kappa"] == k and v["g"] == "oracle" and v["M"] == Mmax]
        if vs:
            parts.append(f"kappa = {k:g}: " + ", ".join(
                f"{name.get(v['method'], v['method'])} {v['h2h'][0]:.3f} [{v['h2h'][1]:.3f}, {v['h2h'][2]:.3f}] "
                f"({v['verdict']})" for v in vs))
    if not parts:
        return None
    return (f"On the language-model testbed (known non-BT gold preference, pairs from pi_ref, {s['seeds']} seeds, "
            f"n = {s['n']}), VRPO with the oracle g and M = {Mmax} against same-seed DPO (gold head-to-head win "
            f"rate): " + "; ".join(parts) + f". Over all {s['settings']} method settings compared with DPO: "
            f"{s['helps']} help, {s['hurts']} hurt, {s['none']} show no detectable difference "
            "(`sections/llm_regret.md`).")


def readme_block(fs, val=None, hh=None) -> list[str]:
    """The README's 'What we found' bullets, computed (``README.md`` must quote them verbatim)."""
    N = _numbers(fs, val, hh)
    bullets = [_gain_bullet(N), _prompt_bullet(N), _hurt_bullet(N), _lam1_bullet(N), _self_bullet(N),
               _validation_bullet(N), _hh_bullet(N), _policy_bullet(N, fs), _llm_regret_bullet(fs)]
    return [f"- {b}" for b in bullets if b]


# --------------------------------------------------------------------------- 1. findings


def _findings(fs, val, hh) -> list[str]:
    comp = fs.compare
    N = _numbers(fs, val, hh)
    out = ["## 1. Findings", ""]
    if "kappa" in N:
        k = N["kappa"]
        fam = k.sort_values("kappa")
        inc, non = [], []
        for f_, grp in fam.groupby("family", sort=False):
            r_ = np.concatenate([[1.0], grp["var_ratio_th"].to_numpy()])
            (inc if np.all(np.diff(r_) <= 1e-9) else non).append(f_)
        mono = (f"The predicted gain grows with kappa in {', '.join(f'`{f_}`' for f_ in sorted(inc))}"
                + (f", but not monotonically in {', '.join(f'`{f_}`' for f_ in sorted(non))} (F2)." if non else "."))
        ref = ""
        if "reference" in fs.tables and "kappa" in fs.configs:
            rr = fs.tables["reference"]
            rr = rr[rr["method"] == "vr"].iloc[0]
            base = k[k["scenario"].isin([MISSPEC_REF, "mixture:1"])]
            if len(base):
                d = float(rr["var_ratio_th"]) - float(base["var_ratio_th"].iloc[0])
                ref = (f" With sharper labels (`{MISSPEC_REF}` at scale {fs.configs['reference'].scale:g} instead of "
                       f"{fs.configs['kappa'].scale:g}) the predicted ratio is {_f(rr['var_ratio_th'])} against "
                       f"{_f(base['var_ratio_th'].iloc[0])}: the gain {_word(-d, 'grows', 'shrinks', 'is unchanged', 1e-3)}.")
        best = k.head(3)
        out.append("- **Where VR helps most.** The largest predicted variance reductions (lam = 1, oracle g, M = "
                   f"{fs.configs['kappa'].M}, same prompts) are in "
                   + "; ".join(f"`{r.scenario}` (predicted ratio {_f(r.var_ratio_th)}, simulated "
                               f"{_pm(r.var_ratio_sim, r.var_ratio_sim_se)})" for r in best.itertuples())
                   + ". " + mono + ref)
        bt = N["bt_sim"]
        none = N["none"]
        out.append("- **Where it does nothing.** Under BT (`bt`, predicted ratio "
                   + (_f(float(N["bt_th"].iloc[0]), "{:.4f}") if len(N["bt_th"]) else "-") + "; simulated "
                   + (", ".join(_pm(r.var_ratio_sim, r.var_ratio_sim_se) for r in bt.itertuples()) + " at n >= 1000"
                      if len(bt) else "no cell at n >= 1000")
                   + ") and, within 2%, in "
                   + (", ".join(f"`{s}`" for s in none["scenario"]) if len(none) else "no other cell of the zoo")
                   + ". By docs/method.md s3 the gain is the within-prompt misspecification variance (1 - 1/M) E_x Var(m|x), "
                   "zero when BT holds.")
    pb = _prompt_bullet(N)
    if pb:
        out.append("- **Prompt-level annotator types (`vrpo validate`).** " + pb)
    fresh = comp[comp["sweep"].str.endswith("-fresh") & (comp["method"] == "vr")]
    same = comp[comp["sweep"].str.endswith("-same") & (comp["method"] == "vr")]
    if len(fresh) and len(same):
        Mx, M1 = int(max(fresh["M"])), int(min(fresh["M"]))
        f_, s_ = fresh[fresh["M"] == Mx].iloc[0], same[same["M"] == Mx].iloc[0]
        f1, s1 = fresh[fresh["M"] == M1].iloc[0], same[same["M"] == M1].iloc[0]
        a1 = comp[comp["sweep"].str.endswith("-fresh") & (comp["method"] == "vr-auto") & (comp["M"] == M1)].iloc[0]
        out.append(f"- **M and fresh prompts (F4, `{s_.scenario}`).** At M = {Mx} the predicted ratio is {_f(s_.var_ratio_th)} with "
                   f"shared prompts and {_f(f_.var_ratio_th)} with fresh prompts (simulated "
                   f"{_pm(s_.var_ratio_sim, s_.var_ratio_sim_se)} and {_pm(f_.var_ratio_sim, f_.var_ratio_sim_se)}). "
                   f"With M = {M1}, lam = 1 gives a predicted ratio of {_f(f1.var_ratio_th)} (fresh) and "
                   f"{_f(s1.var_ratio_th)} (shared); the optimal lam is then {_f(a1.lam_th, '{:.2f}')} and VR-auto's "
                   f"predicted ratio {_f(a1.var_ratio_th)}. " + _m_sentence(fs))
    if "hurt" in N:
        hurt, au = N["hurt"], N["auto"]
        cfg = fs.configs["gquality"]
        if len(hurt):
            out.append("- **Where lam = 1 hurts.** With a poor g the VR estimator with lam = 1 is worse than the MLE: "
                       + "; ".join(f"`{gg}` predicted {_f(r.var_ratio_th)}, simulated {_pm(r.var_ratio_sim, r.var_ratio_sim_se)}"
                                   for gg, r in hurt.iterrows())
                       + f" (`{cfg.scenarios[0]}`, n = {cfg.n[0]}). With the power-tuned lam: "
                       + "; ".join(f"`{gg}` lam = {_f(au.loc[gg, 'lam_sim'], '{:.2f}')} (optimum "
                                   f"{_f(au.loc[gg, 'lam_th'], '{:.2f}')}), ratio "
                                   f"{_pm(au.loc[gg, 'var_ratio_sim'], au.loc[gg, 'var_ratio_sim_se'])}"
                                   for gg in hurt.index if gg in au.index) + ".")
        vr = comp[(comp["sweep"] == "gquality") & (comp["method"] == "vr")].set_index("g")
        if "learned:5" in vr.index and "learned:5" in au.index:
            r = vr.loc["learned:5"]
            a = au.loc["learned:5"]
            out.append(f"- **A learned g (`learned:5`)** has a predicted ratio {_f(r.var_ratio_th)} at lam = 1 (simulated "
                       f"{_pm(r.var_ratio_sim, r.var_ratio_sim_se)}: "
                       f"{_word((r.var_ratio_sim - 1) / r.var_ratio_sim_se, 'worse than', 'better than', 'not distinguishable from', 2.0)}"
                       f" the MLE). The theory uses the limit of its feature class; VR-auto's mean data-tuned lam is "
                       f"{_f(a.lam_sim, '{:.2f}')} against that limit's optimum {_f(a.lam_th, '{:.2f}')}.")
    lb = _lam1_bullet(N)
    if lb:
        d = N["lam1"]
        worst = d.loc[d["nc_vr"].idxmax()]
        out.append("- **No finite minimiser at lam = 1 (F7).** " + lb + f" The worst cell is `{worst['g']}` at n = "
                   f"{int(worst['n'])} ({_pm(100 * worst['nc_vr'], 100 * worst['nc_vr_se'], '{:.1f}')}%). The kept "
                   f"fits' own bias is {d['bias_vr_sd'].min():.2f}-{d['bias_vr_sd'].max():.2f} SD against the MLE's "
                   f"{d['bias_mle_sd'].min():.2f}-{d['bias_mle_sd'].max():.2f} SD on the same samples (the O(1/n) "
                   "bias of logistic M-estimators); the largest selection shift, "
                   f"{np.nanmax(d['selection_sd']):.3f} SD, is "
                   f"{_word(np.nanmax(d['selection_sd']) - np.nanmedian(d['bias_vr_sd']), 'larger', 'smaller', 'as large')}"
                   f" than the kept fits' median bias ({np.nanmedian(d['bias_vr_sd']):.2f} SD).")
        sweeps_nc = int(comp[comp["method"] == "vr"]["nonconverged"].sum())
        n_vr = int(comp[comp["method"] == "vr"][["reps", "nonconverged"]].sum().sum())
        out.append(f"  In the figure sweeps (n >= {int(comp['n'].min())}) {sweeps_nc} of {n_vr} lam = 1 fits had no "
                   "finite minimiser.")
    sb = _self_bullet(N)
    if sb:
        gq = comp[(comp["sweep"] == "gquality") & (comp["g"] == "self") & (comp["method"] == "vr")]
        out.append("- **The `self` auxiliary model does not help at all.** " + sb
                   + (f" Its predicted ratio is {_f(gq['var_ratio_th'].iloc[0], '{:.4f}')}; VR-auto's mean lam with it "
                      f"is {_f(fs.data.get('self_auto_lam'), '{:.2f}')}." if len(gq) else ""))
    if "main" in fs.summaries:
        sm = fs.summaries["main"]
        w = sm[sm["method"] != "mle"]
        dev = (w["win_mle"] - 0.5)
        pos = int(((dev - Z95 * w["win_mle_se"]) > 0).sum())
        neg = int(((dev + Z95 * w["win_mle_se"]) < 0).sum())
        mix = comp[(comp["sweep"] == "main") & (comp["scenario"] == MISSPEC_REF) & (comp["method"] == "vr")]
        gain = 1 - float(mix["var_ratio_th"].iloc[0]) if len(mix) else np.nan
        out.append(f"- **Win rate under p* (F5).** The VR policies' win rate over the MLE policy differs from 1/2 by at "
                   f"most {_f(dev.abs().max(), '{:.1e}')} (all n, both scenarios); {pos} of {len(w)} cells are "
                   f"significantly above 1/2 and {neg} significantly below (95%). A {_f(100 * gain, '{:.0f}')}% "
                   "lower parameter variance moves head-to-head preference by that little because both policies "
                   "fluctuate around the same pi_theta*: the first-order term of the win rate averages out.")
    m = comp[(comp["sweep"] == "main") & (comp["n"] >= 1000)]
    if len(m):
        out.append("- **Coverage.** At n >= 1000 in sweep `main` the 95% Wald intervals cover theta* in "
                   + "; ".join(f"{meth}: {_f(m[m.method == meth]['coverage_sim'].min())}-"
                               f"{_f(m[m.method == meth]['coverage_sim'].max())}" for meth in ["mle", "vr", "vr-auto"])
                   + " of coordinates (see the coverage table).")
    vb = _validation_bullet(N)
    if vb:
        out.append("- **Validation.** " + vb)
    else:
        out.append(f"- **Validation.** `sections/{VALIDATION_SECTION[0]}` is missing: run {VALIDATION_SECTION[1]}.")
    out += ["", "**README summary** (quoted verbatim in README.md, checked by `tests/test_figures.py`):", "",
            README_START] + readme_block(fs, val, hh) + [README_END, ""]
    return out


def _m_sentence(fs) -> str:
    from .figures import _m_note

    return _m_note(fs.data.get("m_diagnosis"))


# --------------------------------------------------------------------------- 2. theory vs simulation


def _diagnose(r, comp, groups, fs) -> str:
    """A diagnosis of one flagged figure-sweep comparison, from its numbers (never a fixed verdict)."""
    why = []
    if r.nonconverged > 0:
        why.append(f"{int(r.nonconverged)} non-converged fits excluded")
    if r.check == "coverage":
        rel_s = r.trV_sandwich / r.trV_th - 1
        z_s = (r.trV_sandwich - r.trV_th) / r.trV_sandwich_se if r.trV_sandwich_se > 0 else np.nan
        why.append(f"{'over' if r.coverage_sim > r.coverage_nominal else 'under'}-coverage; mean sandwich n tr Cov_hat "
                   f"{r.trV_sandwich:.2f} is {abs(rel_s):.0%} {_word(rel_s, 'above', 'below', 'at')} tr V "
                   f"{r.trV_th:.2f} (z = {z_s:+.1f}); simulated n tr Cov {r.ntrcov_sim:.2f} ± {r.ntrcov_sim_se:.2f} "
                   f"(z = {r.z_cov:+.1f})")
    elif r.check in ("var_ratio", "regret_ratio"):
        den = comp[(comp["sweep"] == r.sweep) & (comp["scenario"] == r.scenario) & (comp["n"] == r.n)
                   & (comp["method"] == "mle")]
        if len(den):
            zd = float(den["z_cov"].iloc[0])
            why.append(f"numerator (VR n tr Cov) z = {r.z_cov:+.1f}, denominator (MLE) z = {zd:+.1f}: the "
                       + ("numerator moved" if abs(r.z_cov) > 2 > abs(zd) else
                          "denominator moved" if abs(zd) > 2 > abs(r.z_cov) else
                          "both moved" if abs(zd) > 2 and abs(r.z_cov) > 2 else "ratio moved more than either level"))
    else:
        sim_col = {"cov": "ntrcov_sim", "regret": "nregret_sim"}[r.check]
        th_col = {"cov": "trV_th", "regret": "regret_const_th"}[r.check]
        rel = getattr(r, sim_col) / getattr(r, th_col) - 1
        why.append(f"simulation {_word(rel, 'above', 'below', 'at')} theory by {abs(rel):.1%}")
    larger = comp[(comp["scenario"] == r.scenario) & (comp["g"] == r.g) & (comp["method"] == r.method)
                  & (comp["n"] > r.n) & (comp["sweep"] == r.sweep)]
    if len(larger) and f"z_{r.check}" in larger:
        why.append("z at larger n: " + ", ".join(f"n = {int(a)}: {b:+.1f}" for a, b in zip(larger["n"], larger[f"z_{r.check}"])))
    others = groups.get((r.sweep, r.scenario), [])
    if others:
        zs = comp[comp["sweep"].isin(others) & (comp["scenario"] == r.scenario) & (comp["n"] == r.n)
                  & (comp["method"] == r.method) & (comp["g"] == r.g)][f"z_{r.check}"].dropna()
        same = ("" if not len(zs) else
                f", where the same check (same g and method) has z = {zs.iloc[0]:+.1f}" if len(zs) == 1 else
                f", where the same check (same g and method) has z from {zs.min():+.1f} to {zs.max():+.1f}")
        why.append(f"shares its labelled data with {len(others)} other sweep(s) (" + ", ".join(f"`{o}`" for o in others[:4])
                   + ("..." if len(others) > 4 else "") + ")" + same)
    return "; ".join(why)


def _agreement_section(fs, val_text) -> list[str]:
    out = ["## 2. Theory vs simulation", ""]
    if val_text:
        out += [val_text.rstrip().replace("<!--", "<!-- (from sections/validation.md)", 0), ""]
    else:
        out += [f"> *Missing:* `sections/{VALIDATION_SECTION[0]}` ({VALIDATION_SECTION[1]}) has not been generated "
                "yet; run that command to fill this slot.", ""]
    comp = fs.compare
    n_min = 0 if fs.smoke else 1000
    groups = shared_data_groups(fs.configs)
    long = holm_table(comp, n_min=n_min, alpha=ALPHA_FIG)
    nz = len(long)
    out.append("### 2.2 The figure sweeps against the theory")
    out.append("")
    out.append(f"The figure sweeps are sized for drawing (`vrpo figures` runs in minutes), not for testing: "
               f"{int(comp['reps'].min())}-{int(comp['reps'].max())} replications per cell, and sweeps that share seed, "
               "bandit and scenario share their labelled data (below). Each cell compares a Monte Carlo estimate with "
               "the population theory (its jackknife SE included); ratios VR/MLE are paired within a cell. Holm over "
               f"all {nz} comparisons at n >= {n_min}, family-wise {ALPHA_FIG:g} (the first rejection needs "
               f"|z| > {holm_threshold(max(nz, 1), ALPHA_FIG):.2f}).")
    out.append("")
    agg = agreement_summary(comp, n_min=n_min)
    agg_all = agreement_summary(comp, n_min=0)
    rej = long.groupby("check")["rejected"].sum() if nz else pd.Series(dtype=int)
    t = pd.DataFrame({
        "check": [CHECK_NAMES[c] for c in agg["check"]],
        f"cells (n >= {n_min})": agg["cells"], f"abs z > {Z_FLAG:g}": agg["cells"] - agg["within"],
        "expected by chance": [f"{c * p_two_sided(Z_FLAG):.2f}" for c in agg["cells"]],
        "rejected (Holm)": [int(rej.get(c, 0)) for c in agg["check"]],
        "all n: within / cells": [f"{w} / {c}" for w, c in zip(agg_all["within"], agg_all["cells"])],
    })
    out += [md_table(t), ""]
    flagged = long[(long["z"].abs() > Z_FLAG) | long["rejected"]] if nz else long
    if len(flagged):
        out.append(f"Flagged comparisons (|z| > {Z_FLAG:g} or rejected) and the numbers behind each:")
        out.append("")
        ft = pd.DataFrame({
            "sweep": flagged["sweep"], "scenario": flagged["scenario"], "g": flagged["g"], "method": flagged["method"],
            "n": flagged["n"], "check": flagged["check"], "z": [f"{v:+.2f}" for v in flagged["z"]],
            "Holm p": [f"{v:.2g}" for v in flagged["p_holm"]],
            "diagnosis": [_diagnose(r, comp, groups, fs) for r in flagged.itertuples()],
        })
        out += [md_table(ft), ""]
    else:
        out += [f"No comparison at n >= {n_min} is beyond {Z_FLAG:g} SE.", ""]
    shared = {k: v for k, v in groups.items() if v}
    if shared:
        fams = sorted({tuple(sorted([k[0]] + v)) for k, v in shared.items()}, key=len, reverse=True)
        out.append("Shared labelled data (computed from the sweep configurations): "
                   + "; ".join("{" + ", ".join(f"`{x}`" for x in f) + "}" for f in fams[:3])
                   + (f" and {len(fams) - 3} more groups" if len(fams) > 3 else "")
                   + ". Their comparisons are not independent; the independent, high-power checks are in 2.1.")
        out.append("")
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
        "coverage": [_pm(a, b) for a, b in zip(show["coverage_sim"], show["coverage_sim_se"])],
        "lam (sim)": [_f(v, "{:.2f}") for v in show["lam_sim"]],
        "lam (th)": [_f(v, "{:.2f}") for v in show["lam_th"]],
        "flag": ["⚑" if any(abs(getattr(r, f"z_{c}", np.nan)) > Z_FLAG for c in CHECKS if hasattr(r, f"z_{c}"))
                 else "" for r in show.itertuples()],
    })
    out += ["<details><summary>Full theory-vs-simulation table of the figure sweeps</summary>", "", md_table(full), "",
            "</details>", ""]
    return out


def _reference_section(fs) -> list[str]:
    if "reference" not in fs.tables:
        return []
    t = fs.tables["reference"]
    cfg = fs.configs["reference"]
    mle = t[t["method"] == "mle"].iloc[0]
    vr = t[t["method"] == "vr"].iloc[0]
    out = ["### Reference numbers of docs/method.md section 7", ""]
    out.append("docs/method.md section 7 reports, for its own construction of the bandit (d = 4, K = 8, uniform pi_ref, beta = 1, "
               "mixture at scale 10, M = 4, oracle g, n = 1000, 400 replications), tr V_MLE = 100.0, tr V_VR = 86.8 "
               "(ratio 0.87), simulated n tr Cov 106.6 and 93.8, n E[regret] 5.11 ± 0.19 (MLE) and 4.46 ± 0.16 (VR) "
               f"against theory 4.87 and 4.23. Our sweep `reference` (`{cfg.scenarios[0]}`, scale {cfg.scale:g}, seed "
               f"{cfg.seed}, {int(mle['reps'])} replications) gives:")
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
    out += [md_table(tab), ""]
    d = float(vr["var_ratio_th"]) - 0.87
    out.append(f"Our predicted variance ratio {_f(vr['var_ratio_th'])} is {abs(d):.3f} {_word(d, 'above', 'below', 'at')} "
               f"docs/method.md's 0.87, and our tr V_MLE {_f(mle['trV_th'], '{:.1f}')} is "
               f"{100.0 / float(mle['trV_th']):.1f} times smaller than its 100.0: the scenario's construction (annotator "
               "types, feature law) is not the one behind docs/method.md's numbers, so only the ratio is comparable. No "
               "tuning was done to match.")
    out.append("")
    return out


def _coverage_section(fs) -> list[str]:
    comp = fs.compare
    out = ["### Coverage of the 95% Wald intervals (F6)", ""]
    sub = comp[comp["sweep"].isin(["main"])].sort_values(["scenario", "n"])
    piv = {}
    for r in sub.itertuples(index=False):
        piv.setdefault((r.scenario, r.n), {})[r.method] = _pm(r.coverage_sim, r.coverage_sim_se)
    rows = [{"scenario": s, "n": n, **{m: v.get(m, "-") for m in ["mle", "vr", "vr-auto"]}} for (s, n), v in piv.items()]
    out += [md_table(pd.DataFrame(rows).rename(columns={"mle": "BT-MLE", "vr": "VR", "vr-auto": "VR-auto"})), ""]
    k = comp[comp["sweep"] == "kappa"]
    if len(k):
        lo = k.groupby("method")["coverage_sim"].agg(["min", "median", "max"])
        out.append("Across the `kappa` sweep (every zoo scenario, n = " + ", ".join(str(int(v)) for v in sorted(set(k["n"])))
                   + "): " + "; ".join(f"{m}: coverage {_f(r['min'])}-{_f(r['max'])} (median {_f(r['median'])})"
                                       for m, r in lo.iterrows()) + ".")
        out.append("")
    return out


def _lam1_section(fs) -> list[str]:
    d = fs.data.get("lam1")
    if d is None or not len(d):
        return []
    cfg = fs.data["lam1_config"]
    out = [f"### The finite-sample side of lam = 1 (F7; `{cfg.scenario}`, {cfg.reps} replications per n)", ""]
    tab = pd.DataFrame({
        "g": d["g"], "n": d["n"],
        "no finite minimiser, VR (%)": [_pm(100 * a, 100 * b, "{:.1f}") for a, b in zip(d["nc_vr"], d["nc_vr_se"])],
        "separation, MLE (%)": [_f(100 * a, "{:.1f}") for a in d["nc_mle"]],
        "bias of kept VR fits (SD)": [_f(v, "{:.3f}") for v in d["bias_vr_sd"]],
        "MLE bias (SD)": [_f(v, "{:.3f}") for v in d["bias_mle_sd"]],
        "selection shift of MLE twins (SD; z)": [("-" if not np.isfinite(a) else f"{a:.3f}; {b:.1f}")
                                                 for a, b in zip(d["selection_sd"], d["selection_z"])],
    })
    out += ["<details><summary>Table behind F7</summary>", "", md_table(tab), "", "</details>", ""]
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
    known = [name for name, _ in SECTION_ORDER] + [VALIDATION_SECTION[0]]
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
    if "lam1_config" in fs.data:
        out.append(f"- `lam1` (F7): `{json.dumps(fs.data['lam1_config'].identity(), sort_keys=True, default=str)}`")
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
    val_text = _fragment(fs.out_dir, VALIDATION_SECTION[0])
    val = read_summary(val_text) if val_text else None
    hh = read_summary(_fragment(fs.out_dir, "hh_reward.md") or "")
    head = ["# Theory checks and paper figures", "",
            f"*Generated by `vrpo figures` ({'smoke configuration, ' if fs.smoke else ''}vrpo {vrpo.__version__}, "
            f"commit {git_commit()}, {now}). Do not edit: rerun the command. Sweeps, studies and theory "
            f"{'read from cache' if fs.data.get('all_cached') else 'computed'} in {_f(tm.get('sweeps_and_theory'), '{:.0f}')} s, "
            f"figures drawn in {_f(tm.get('figures'), '{:.0f}')} s.*", ""]
    if fs.smoke:
        head += ["> **Smoke configuration**: few replications; numbers are not meaningful.", ""]
    body = (_findings(fs, val, hh) + _agreement_section(fs, val_text) + _reference_section(fs) + _coverage_section(fs)
            + _lam1_section(fs) + _figures_section(fs) + _sections_slot(fs.out_dir) + _config_section(fs))
    return "\n".join(head + body).rstrip() + "\n"


def write_report(fs, path=None) -> Path:
    """Write the report atomically to ``path`` (default ``<out_dir>/REPORT.md``)."""
    path = Path(path) if path else Path(fs.out_dir) / "REPORT.md"
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write(render_report(fs))
    return path
