"""Figures and the generated report section of ``vrpo llm-regret`` (:mod:`llm.lm_regret`).

Every number and every direction in the section is computed from the run record
(``run.json``), the cell summaries and the gradient probes; fixed sentences only state
the design. Outputs go to ``out_dir`` (``llm_regret_*.png``, ``llm_regret.md``); with
``publish`` they are also copied to ``publish_dir`` (``paper_figures/`` and
``paper_figures/sections/llm_regret.md``), the only way this experiment changes
published files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from vrpo_common.fileio import save_figure, write_text
from vrpo_common.report import git_commit, md_table
from vrpo_common.stats import Z95

__all__ = ["write_report", "render_section", "FIGURES", "regenerate"]

FIGURES = ("llm_regret_win_vs_n.png", "llm_regret_head_to_head.png", "llm_regret_grad_variance.png",
           "llm_regret_gold.png")
METHOD_COLOR = {"dpo": "#444444", "cdpo": "#8c6d31", "rdpo": "#7b4173", "vrpo": "#1f77b4", "vrpo-auto": "#d62728"}
LABEL = {"dpo": "DPO", "cdpo": "cDPO", "rdpo": "rDPO", "vrpo": "VRPO lam=1", "vrpo-auto": "VRPO lam=auto"}


def _f(v, fmt="{:.3f}") -> str:
    return "-" if v is None or not np.isfinite(v) else fmt.format(v)


def _ci(m, lo, hi, fmt="{:.3f}") -> str:
    return f"{_f(m, fmt)} [{_f(lo, fmt)}, {_f(hi, fmt)}]"


def _g_name(cfg, g: str) -> str:
    from .lm_regret import _g_label

    return "-" if g == "-" else _g_label(cfg, g)


METHOD_ORDER = {"dpo": 0, "cdpo": 1, "rdpo": 2, "vrpo": 3, "vrpo-auto": 4}


def _ordered(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in the reading order: DPO, cDPO, rDPO, then VRPO lam=1 and lam=auto by g and M."""
    key = df.method.map(METHOD_ORDER)
    return df.assign(_o=key).sort_values(["_o", "g", "M"]).drop(columns="_o")


def _variant(r) -> str:
    """Readable method name of a cell row: ``VRPO lam=1 (oracle p*, M=4)`` or ``DPO``."""
    if r["g"] == "-":
        return LABEL[r["method"]]
    return f"{LABEL[r['method']]} ({r['g']}, M={int(r['M'])})"


# --------------------------------------------------------------------------- figures


def _fig_win_vs_n(cfg, cells: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gs = list(cfg.all_gs)
    nk, ng = len(cfg.kappas), len(gs)
    fig, axes = plt.subplots(nk, ng, figsize=(3.6 * ng + 0.5, 3.0 * nk + 0.6), squeeze=False, sharex=True)
    ns = np.array(cfg.ns, float)
    for a, k in enumerate(cfg.kappas):
        for b, g in enumerate(gs):
            ax = axes[a, b]
            sub = cells[cells.kappa == k]
            lines = [(m, "-", None) for m in cfg.baselines]
            lines += [(m, ls, M) for m in ("vrpo", "vrpo-auto") for M, ls in zip(sorted(cfg.Ms), ("--", "-", ":"))]
            off = np.linspace(-0.04, 0.04, len(lines))
            for (m, ls, M), o in zip(lines, off):
                if m in cfg.baselines:
                    s = sub[(sub.method == m)]
                else:
                    s = sub[(sub.method == m) & (sub.g == g) & (sub.M == M)]
                if s.empty:
                    continue
                s = s.sort_values("n")
                x = s.n.to_numpy(float) * np.exp(o)
                lab = LABEL[m] + (f", M={M}" if M else "")
                ax.errorbar(x, s.win_ref_mean, yerr=[s.win_ref_mean - s.win_ref_lo, s.win_ref_hi - s.win_ref_mean],
                            color=METHOD_COLOR[m], ls=ls, marker="o", ms=3, lw=1.2, capsize=2, label=lab,
                            alpha=0.9 if m.startswith("vrpo") else 0.7)
            ax.axhline(0.5, color="k", lw=0.6, ls=":")
            ax.set_xscale("log")
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xticks(ns)
            ax.set_xticklabels([str(int(v)) for v in ns])
            ax.set_title(f"kappa = {k:g}, g = {g}", fontsize=9)
            if b == 0:
                ax.set_ylabel("gold win rate vs pi_ref")
            if a == nk - 1:
                ax.set_xlabel("labelled pairs n")
            ax.tick_params(labelsize=8)
    h, lab = axes[0, 0].get_legend_handles_labels()
    fig.legend(h, lab, loc="lower center", ncol=min(len(lab), 4), fontsize=7, frameon=False)
    fig.suptitle(f"Gold win rate vs pi_ref (mean over {cfg.seeds} seeds, 95% t-intervals over seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0.09, 1, 0.97))
    save_figure(fig, path, dpi=130)
    plt.close(fig)


def _fig_head_to_head(cfg, cells: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub = cells[cells.method != "dpo"].copy()
    sub["order"] = sub.method.map({"cdpo": 0, "rdpo": 1, "vrpo": 2, "vrpo-auto": 3})
    sub = sub.sort_values(["kappa", "n", "order", "g", "M"], ascending=[True, False, True, True, True])
    nk = len(cfg.kappas)
    per = max(len(sub[sub.kappa == k]) for k in cfg.kappas)
    fig, axes = plt.subplots(1, nk, figsize=(5.2 * nk, 0.22 * per + 1.4), squeeze=False, sharey=False)
    colors = {"helps": "#2ca02c", "hurts": "#d62728", "no detectable difference": "#7f7f7f"}
    for a, k in enumerate(cfg.kappas):
        ax = axes[0, a]
        s = sub[sub.kappa == k].reset_index(drop=True)
        y = np.arange(len(s))[::-1]
        for yi, (_, r) in zip(y, s.iterrows()):
            c = colors[r.verdict]
            ax.plot([r.win_dpo_lo, r.win_dpo_hi], [yi, yi], color=c, lw=1.5)
            ax.plot(r.win_dpo_mean, yi, "o", color=c, ms=3.5)
        ax.axvline(0.5, color="k", lw=0.7, ls=":")
        ax.set_yticks(y)
        ax.set_yticklabels([f"n={int(r.n)}  {_variant(r)}" for _, r in s.iterrows()], fontsize=6.5)
        ax.set_xlabel("gold win rate vs same-seed DPO", fontsize=8)
        ax.set_title(f"kappa = {k:g}", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    handles = [plt.Line2D([], [], color=c, marker="o", lw=1.5, label=v) for v, c in colors.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(f"Head to head against DPO (95% t-intervals over {cfg.seeds} seeds; verdict = interval vs 1/2)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.96))
    save_figure(fig, path, dpi=130)
    plt.close(fig)


def _fig_grad_variance(cfg, probe_ref: dict, trained: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = pd.DataFrame(probe_ref["rows"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    ax = axes[0]
    rows = rows.sort_values(["g", "kappa", "M"]).reset_index(drop=True)
    x = np.arange(len(rows))
    ax.errorbar(x - 0.15, rows.cf_ratio, yerr=Z95 * rows.cf_ratio_se, fmt="s", color="#1f77b4", ms=4, capsize=2,
                label="closed form, population (95% jackknife)")
    ax.plot(x, rows.exact_ratio, "D", color="#2ca02c", ms=3.5, label="exact on the probed examples")
    if "mc_ratio" in rows:
        m = rows.mc_ratio.notna()
        ax.errorbar(x[m] + 0.15, rows.mc_ratio[m], yerr=[rows.mc_ratio[m] - rows.mc_ratio_lo[m],
                                                        rows.mc_ratio_hi[m] - rows.mc_ratio[m]],
                    fmt="o", color="#d62728", ms=4, capsize=2, label="Monte Carlo minibatch probe (bootstrap 95%)")
    ax.axhline(1, color="k", lw=0.7, ls=":")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{r.g} k={r.kappa:g} M={int(r.M)}" for r in rows.itertuples()], fontsize=6.5, rotation=60,
                       ha="right")
    ax.set_ylabel("tr Cov(VRPO grad) / tr Cov(DPO grad)")
    ax.set_title("at pi_ref, lam = 1", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    ax = axes[1]
    if len(trained):
        t = trained.reset_index(drop=True)
        xt = np.arange(len(t))
        ax.errorbar(xt, t.ratio, yerr=[t.ratio - t.ratio_lo, t.ratio_hi - t.ratio], fmt="o", color="#d62728",
                    capsize=2, ms=4, label="lam = 1")
        ax.errorbar(xt + 0.15, t.ratio_at_lam_opt, yerr=[t.ratio_at_lam_opt - t.ratio_at_lam_opt_lo,
                                                         t.ratio_at_lam_opt_hi - t.ratio_at_lam_opt],
                    fmt="^", color="#2ca02c", capsize=2, ms=4, label="best lam (same draws)")
        ax.set_xticks(xt)
        ax.set_xticklabels([f"{r.policy}\nk={r.kappa:g}" for r in t.itertuples()], fontsize=7)
        ax.axhline(1, color="k", lw=0.7, ls=":")
        ax.legend(fontsize=7, frameon=False)
    ax.set_title(f"at trained policies (oracle g, M={cfg.M_max})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)
    plt.close(fig)


def _fig_gold(cfg, record: dict, cells: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = cells[cells.n == max(cfg.ns)]
    top = pd.concat([_ordered(top[top.kappa == k]) for k in cfg.kappas])
    fig, axes = plt.subplots(1, 3, figsize=(13, max(3.3, 0.16 * len(top) + 1.2)))
    ax = axes[0]
    edges = np.linspace(0, 1, 11)
    width = 0.1 / (len(cfg.kappas) + 0.5)
    for i, k in enumerate(cfg.kappas):
        h = np.asarray(record["gold_checks"][f"{k:g}"]["p_star"]["hist"], float)
        ax.bar(edges[:-1] + width * (i + 0.25), h / h.sum(), width=width, align="edge", label=f"kappa = {k:g}")
    ax.set_xlabel("p*(x, y1, y2) on pi_ref pairs (held-out prompts)")
    ax.set_ylabel("share of pairs")
    ax.legend(fontsize=7, frameon=False)
    ax.set_title("gold preference between pi_ref samples", fontsize=9)
    for ax, col, lab in ((axes[1], "kl", "KL(policy || pi_ref) (nats)"), (axes[2], "len_tokens",
                                                                          "generated tokens")):
        sub = top
        names = [_variant(r) + f", kappa={r['kappa']:g}" for _, r in sub.iterrows()]
        y = np.arange(len(sub))[::-1]
        ax.errorbar(sub[f"{col}_mean"], y, xerr=[sub[f"{col}_mean"] - sub[f"{col}_lo"],
                                                  sub[f"{col}_hi"] - sub[f"{col}_mean"]],
                    fmt="o", ms=3, color="#444444", capsize=1.5)
        ax.set_yticks(y)
        ax.set_yticklabels(names, fontsize=6)
        ax.set_xlabel(lab, fontsize=8)
        ax.set_title(f"n = {max(cfg.ns)} (95% t-intervals over seeds)", fontsize=9)
    if "pi_ref_len_tokens" in record.get("gold_checks_extra", {}):
        axes[2].axvline(record["gold_checks_extra"]["pi_ref_len_tokens"], color="k", ls=":", lw=0.8)
        axes[2].text(record["gold_checks_extra"]["pi_ref_len_tokens"], 0.01, " pi_ref", fontsize=7, va="bottom",
                     transform=axes[2].get_xaxis_transform())
    fig.tight_layout()
    save_figure(fig, path, dpi=130)
    plt.close(fig)


# --------------------------------------------------------------------------- the section


def _verdict_phrase(r) -> str:
    lo, hi = r.win_dpo_lo, r.win_dpo_hi
    if r.verdict == "helps":
        return f"helps (head-to-head {_ci(r.win_dpo_mean, lo, hi)}, above 1/2)"
    if r.verdict == "hurts":
        return f"hurts (head-to-head {_ci(r.win_dpo_mean, lo, hi)}, below 1/2)"
    return f"no detectable difference (head-to-head {_ci(r.win_dpo_mean, lo, hi)} covers 1/2)"


def _trained_probes(cfg) -> pd.DataFrame:
    from .lm_regret import task_paths, tasks

    rows = []
    for t in tasks(cfg):
        j, _ = task_paths(cfg, t)
        if not j.exists():
            continue
        r = json.loads(j.read_text())
        if r.get("probe"):
            p = r["probe"]
            rows.append({"kappa": t.kappa, "policy": "DPO" if t.method == "dpo" else "VRPO", **{
                k: p[k] for k in ("ratio", "ratio_lo", "ratio_hi", "lam_opt", "ratio_at_lam_opt",
                                  "ratio_at_lam_opt_lo", "ratio_at_lam_opt_hi", "mean_grad_norm_dpo",
                                  "mean_grad_norm_vrpo")}})
    return pd.DataFrame(rows)


def render_section(cfg, record: dict, cells: pd.DataFrame, table: pd.DataFrame, probe_ref: dict,
                   trained: pd.DataFrame) -> str:
    """The markdown fragment; every number and direction below comes from the arguments."""
    from scipy.stats import binom

    c = cfg
    g = record["gold"]
    pi = record["pi_ref"]
    nmax = max(c.ns)
    S = c.seeds
    L = []
    L.append("## Regret curves on a language model: DPO vs VRPO under a known gold preference")
    L.append("")
    L.append(f"_Generated by `vrpo llm-regret` (preset `{c.preset}`, experiment key `{record['experiment_key']}`, "
             f"commit `{git_commit()}`) from `{c.out_dir}/`._")
    L.append("")
    # ---------------------------------------------------------------- setup
    hs = g["heads"]
    L.append("**Gold preference (known exactly, not BT).** Two linear reward heads on frozen features of the "
             f"response (`{g['features']['kind']}`: mean MiniLM-L6 input word-piece embedding + log length, "
             f"{g['features']['dim']} dimensions), fitted by ridge BT on the GPT-3.5 labels of the relabeled HH "
             f"pairs: head A on the *helpful* labels ({hs['helpful']['n']} pairs, cross-validated accuracy "
             f"{hs['helpful']['cv_acc']:.3f} ± {hs['helpful']['cv_acc_se']:.3f}), head B on the *harmless* labels "
             f"({hs['harmless']['n']} pairs, {hs['harmless']['cv_acc']:.3f} ± {hs['harmless']['cv_acc_se']:.3f}). "
             f"`p*(x, y1, y2) = (1 - w) sigma(r_A(y1) - r_A(y2)) + w sigma(r_B(y1) - r_B(y2))` with the annotator "
             + ("type drawn per prompt with `w = kappa * " + f"{c.w_max:g}`"
                if c.weight == "constant" else "type drawn per prompt with `w(x) = kappa q(x)`, `q` a red-team "
                "prompt classifier") + ": `kappa = 0` is exactly BT in `r_A`, `kappa = 1` the full mixture. Heads "
             f"scaled (x{g['scale_A']:.2f}, x{g['scale_B']:.2f}) so the reward differences between two `pi_ref` "
             f"samples have standard deviation {c.target_sd:g} (on {g['n_scale_pairs']} pool prompts). The two heads "
             f"{'conflict' if g['head_corr_on_pi_ref_pairs'] < 0 else 'agree'} on `pi_ref` pairs: correlation of "
             f"their reward differences {g['head_corr_on_pi_ref_pairs']:+.2f}, same sign on "
             f"{100 * g['sign_agreement_on_pi_ref_pairs']:.0f}% of pairs.")
    L.append("")
    rows = []
    for k in c.kappas:
        gc = record["gold_checks"][f"{k:g}"]
        s, sw = gc["p_star"], gc["pi_ref_vs_pi_ref"]
        z = (sw["mean"] - 0.5) / sw["se"]
        rows.append({"kappa": f"{k:g}", "median p*": f"{s['median']:.2f}",
                     "IQR": f"[{s['q25']:.2f}, {s['q75']:.2f}]", "5-95%": f"[{s['q05']:.2f}, {s['q95']:.2f}]",
                     "mean abs(p* - 1/2)": f"{s['mean_abs_dev']:.3f}", "mean p*(1-p*)": f"{s['mean_var']:.3f}",
                     "share abs(p* - 1/2) < 0.1": f"{s['share_within_0.1_of_half']:.2f}",
                     "pi_ref vs pi_ref": f"{sw['mean']:.4f} ± {sw['se']:.4f} (z = {z:+.2f})"})
    L.append(f"Distribution of `p*` on {record['gold_checks'][f'{c.kappas[0]:g}']['p_star']['n_pairs']} pairs of "
             "`pi_ref` samples on the held-out prompts, and the win rate of `pi_ref` against itself (an independent "
             "`pi_ref` sample against the reference bank, ± its Monte Carlo SE; 1/2 by antisymmetry):")
    L.append("")
    L.append(md_table(pd.DataFrame(rows)))
    L.append("")
    L.append(f"**Protocol (the method's, exactly).** {record['data']['n_prompts']} unique HH prompts split by prompt "
             f"into a pool of {record['data']['n_pool']} and {record['data']['n_eval']} held-out evaluation prompts. "
             f"`pi_ref`: {'a ' + format(pi['params'], ',') + '-parameter GPT-2 (' + str(pi.get('n_layer')) + ' layers, width ' + str(pi.get('n_embd')) + ', BPE vocabulary ' + str(pi.get('vocab')) + ') trained by SFT on the pool transcripts (loss ' + _f(pi.get('sft_first_loss'), '{:.2f}') + ' -> ' + _f(pi.get('sft_last_loss'), '{:.2f}') + ')' if pi['kind'] == 'sft' else pi['name']}; "
             f"the policy sees the last {c.max_prompt_tokens} prompt tokens and writes at most {c.max_new_tokens}. "
             f"A seed draws n labelled prompts with replacement from the pool, two responses each from `pi_ref`, "
             f"the label `Z ~ Bernoulli(p*)`, and M extra unlabelled pairs per prompt from `pi_ref`; `pi_ref`, the "
             f"gold and the evaluation prompts are fixed. n in {{{', '.join(map(str, c.ns))}}}, {S} seeds per cell, "
             f"kappa in {{{', '.join(f'{k:g}' for k in c.kappas)}}}, M in {{{', '.join(map(str, c.Ms))}}}, "
             f"g in {{{', '.join(_g_name(c, x) for x in c.gs)}}}. Methods, all trained by the suite's "
             f"`VRPOTrainer` (TRL) from the same `pi_ref` on the same data with the same budget ({c.epochs:g} epoch(s) "
             f"of minibatches of {c.batch_size}, lr {c.lr:g} with linear decay, beta {c.beta:g}): DPO (`lam = 0`), "
             f"cDPO (soft label `1 - eps`, eps = {c.eps_cdpo:g}, Mitchell's suggested value), rDPO (TRL "
             f"`loss_type=\"robust\"`, eps = {c.eps_rdpo:g}, the rDPO paper's typical value), VRPO `lam = 1` (the "
             f"paper) and VRPO `lam = \"auto\"` (online power tuning). Metrics, exact under `p*` (no judge): gold "
             f"win rate against `pi_ref` = mean of `p*(x, y, y')` over {c.eval_samples} policy samples x "
             f"{c.ref_samples} `pi_ref` samples per held-out prompt; head-to-head against the same-seed DPO policy; "
             f"`KL(policy || pi_ref)` from the policy's samples; expected held-out implicit-reward accuracy under "
             f"`p*`; generation length. Intervals are Student-t 95% over the {S} seeds; the Monte Carlo SE of the "
             f"evaluation (prompts and samples, clustered by prompt) is reported separately.")
    L.append("")
    # ---------------------------------------------------------------- the headline table
    top = cells[cells.n == nmax].copy()
    L.append(f"### Gold win rates at n = {nmax}")
    L.append("")
    for k in c.kappas:
        sub = _ordered(top[top.kappa == k])
        rows = []
        for _, r in sub.iterrows():
            rows.append({"method": _variant(r), "win vs pi_ref": _ci(r.win_ref_mean, r.win_ref_lo, r.win_ref_hi),
                         "MC SE": _f(r.win_ref_mc_se_of_mean, "{:.4f}"),
                         "vs DPO (head to head)": "-" if r.method == "dpo" else _ci(r.win_dpo_mean, r.win_dpo_lo,
                                                                                     r.win_dpo_hi),
                         "verdict": "-" if r.method == "dpo" else r.verdict,
                         "KL": _ci(r.kl_mean, r.kl_lo, r.kl_hi, "{:.2f}"),
                         "accuracy under p*": _ci(r.acc_mean, r.acc_lo, r.acc_hi),
                         "tokens": _f(r.len_tokens_mean, "{:.1f}"),
                         "final lam": _f(r.lam_final_mean, "{:.2f}") if r.method == "vrpo-auto" else "-"})
        L.append(f"kappa = {k:g}:")
        L.append("")
        L.append(md_table(pd.DataFrame(rows)))
        L.append("")
    L.append("![gold win rate vs n](llm_regret_win_vs_n.png)")
    L.append("")
    L.append(f"_Gold win rate against `pi_ref` per method and n (mean over {S} seeds, 95% t-intervals); panels: "
             "kappa (rows) x g (columns); baselines do not use g and repeat across columns; VRPO dashed at the "
             "smallest M._")
    L.append("")
    # ---------------------------------------------------------------- verdicts
    vr = cells[cells.method != "dpo"]
    nv = len(vr)
    counts = vr.verdict.value_counts().to_dict()
    L.append("### Verdicts: each method against the same-seed DPO, every setting")
    L.append("")
    L.append(f"{nv} settings compared with DPO: {counts.get('helps', 0)} helps, {counts.get('hurts', 0)} hurts, "
             f"{counts.get('no detectable difference', 0)} no detectable difference. With independent settings and "
             f"no true difference, about {0.05 * nv:.1f} would fall outside at the 5% level "
             f"(P(at least {counts.get('helps', 0) + counts.get('hurts', 0)} of {nv}) = "
             f"{binom.sf(counts.get('helps', 0) + counts.get('hurts', 0) - 1, nv, 0.05):.2g}); settings share "
             "seeds, so they are not independent.")
    L.append("")
    rows = []
    for _, r in vr.assign(_o=vr.method.map(METHOD_ORDER)).sort_values(["kappa", "n", "_o", "g", "M"]).iterrows():
        rows.append({"kappa": f"{r.kappa:g}", "n": int(r.n), "method": _variant(r),
                     "head to head vs DPO": _ci(r.win_dpo_mean, r.win_dpo_lo, r.win_dpo_hi),
                     "win vs pi_ref minus DPO's": _ci(r.d_win_ref_mean, r.d_win_ref_lo, r.d_win_ref_hi, "{:+.3f}"),
                     "verdict": r.verdict})
    L.append(md_table(pd.DataFrame(rows)))
    L.append("")
    L.append("![head to head](llm_regret_head_to_head.png)")
    L.append("")
    # ---------------------------------------------------------------- the readings
    L.append("### Reading")
    L.append("")
    L += _readings(c, cells, probe_ref, trained)
    L.append("")
    # ---------------------------------------------------------------- gradient variance
    L.append("### Gradient variance: Monte Carlo probe and closed form at `pi_ref`")
    L.append("")
    L.append("At `pi_ref` every implicit-reward margin is 0, so the per-example gradients are "
             "`psi_DPO = -(Z - 1/2) X` and `psi_VRPO = psi_DPO + lam [(g - 1/2) X - (1/M) sum_m (g_m - 1/2) X_m]` "
             "with `X = grad delta`. Because `(Z - 1/2)^2 = 1/4` exactly, `tr Cov psi_DPO = E|X|^2/4 - |mu|^2` "
             "(`mu = E[(p* - 1/2) X]`) and, for the oracle `g = p*` and `lam = 1`, "
             "`tr Cov psi_VRPO / tr Cov psi_DPO = 1 - (1 - 1/M) E_x tr Cov((p* - 1/2) X | x) / tr Cov psi_DPO` "
             "(docs/method.md s3 with `s = 1/2`; derivation and the general-`g` form in docs/llm_regret.md; the best "
             "`lam` for the oracle is `M/(M+1)`). Per-pair gradients of the first "
             f"{probe_ref['closed_form_prompts']} labelled prompts of seed {c.first_seed} (every pair of each, `p*` "
             "and `g` exact) give two numbers: the closed form for the population (moments over prompts and pairs, "
             "jackknife SE) and the exact ratio on those examples as they are. The Monte Carlo probe draws "
             f"{2 * c.probe_pairs} minibatches of {c.probe_batch_size} of the same examples (labels redrawn from "
             "`p*`) and differentiates the two training objectives; it estimates the exact ratio, so its z-score "
             "against it checks the derivation and the code.")
    L.append("")
    pr = pd.DataFrame(probe_ref["rows"])
    rows = []
    for r in pr.itertuples():
        has_mc = "mc_ratio" in pr and np.isfinite(getattr(r, "mc_ratio", np.nan))
        rows.append({"kappa": f"{r.kappa:g}", "g": r.g, "M": int(r.M),
                     "closed form, population (lam = 1)": f"{r.cf_ratio:.3f} ± {r.cf_ratio_se:.3f}",
                     "exact on the probed examples": f"{r.exact_ratio:.3f}",
                     "Monte Carlo probe": _ci(r.mc_ratio, r.mc_ratio_lo, r.mc_ratio_hi) if has_mc else "-",
                     "z (MC vs exact)": _f(getattr(r, "z_mc_vs_exact", np.nan), "{:+.2f}") if has_mc else "-",
                     "best lam (closed form)": f"{r.cf_lam_opt:.2f}",
                     "ratio at best lam": f"{r.cf_ratio_at_lam_opt:.3f} ± {r.cf_ratio_at_lam_opt_se:.3f}"})
    L.append(md_table(pd.DataFrame(rows)))
    L.append("")
    zs = pr["z_mc_vs_exact"].dropna().to_numpy() if "z_mc_vs_exact" in pr else np.array([])
    if zs.size:
        L.append(f"Monte Carlo vs exact: {int(np.sum(np.abs(zs) <= 2))} of {zs.size} comparisons within 2 standard "
                 f"errors (largest |z| = {np.max(np.abs(zs)):.2f}).")
        L.append("")
    if len(trained):
        rows = []
        for r in trained.itertuples():
            rows.append({"policy": r.policy, "kappa": f"{r.kappa:g}", "VRPO/DPO at lam = 1":
                         _ci(r.ratio, r.ratio_lo, r.ratio_hi), "best lam": f"{r.lam_opt:.2f}",
                         "ratio at best lam": _ci(r.ratio_at_lam_opt, r.ratio_at_lam_opt_lo, r.ratio_at_lam_opt_hi),
                         "mean-gradient norm DPO / VRPO": f"{r.mean_grad_norm_dpo:.3f} / {r.mean_grad_norm_vrpo:.3f}"})
        L.append(f"At the trained policies (seed {c.first_seed}, n = {nmax}, oracle g, M = {c.M_max}; bootstrap 95% "
                 "intervals over minibatch pairs):")
        L.append("")
        L.append(md_table(pd.DataFrame(rows)))
        L.append("")
    L.append("![gradient variance](llm_regret_grad_variance.png)")
    L.append("")
    L.append("![gold and policies](llm_regret_gold.png)")
    L.append("")
    L.append("_Left: `p*` between two `pi_ref` samples per kappa. Middle and right: KL to `pi_ref` and generation "
             f"length of every method at n = {nmax}._")
    L.append("")
    # ---------------------------------------------------------------- caveats and cost
    L.append("**Caveats.** " + _caveats(c, record, cells))
    L.append("")
    tm = record["timings"]
    L.append(f"**Run time.** {tm['total_s'] / 60:.1f} min wall-clock for this run ({tm['tasks_run']} of "
             f"{len(table.cell.unique()) * S} training tasks run now, the rest from earlier runs of the same "
             f"settings), {record['config']['workers_resolved']} worker process(es) x {c.torch_threads} torch "
             f"thread(s) on {record['machine']['cpus']} CPU cores, device {record['config']['device_resolved']}, "
             f"1-min load average {tm['load_avg_start'][0]:.2f} at the start and {tm['load_avg_end'][0]:.2f} at the "
             f"end. Stages: pi_ref {tm['pi_ref_s']:.0f}s, gold {tm['gold_s']:.0f}s, reference bank "
             f"{tm['ref_bank_s']:.0f}s, seed data {tm['seed_data_s']:.0f}s, training + evaluation "
             f"{tm['train_eval_s']:.0f}s (the gradient probe at pi_ref, {tm['probe_ref_s']:.0f}s of one worker, "
             f"beside it). Mean per task: training "
             f"{table.train_s.mean():.1f}s, evaluation {table.eval_s.mean():.1f}s.")
    L.append("")
    L.append(f"<!-- {SUMMARY_TAG}: {json.dumps(_summary(c, cells, probe_ref), sort_keys=True)} -->")
    return "\n".join(L) + "\n"


SUMMARY_TAG = "vrpo-llm-regret-summary"


def _summary(c, cells: pd.DataFrame, probe_ref: dict) -> dict:
    """Machine-readable headline numbers of the section (read by ``analysis.report`` for the README bullet)."""
    vr = cells[cells.method != "dpo"]
    counts = vr.verdict.value_counts().to_dict()
    nmax = max(c.ns)
    out = {"n": int(nmax), "seeds": int(c.seeds), "settings": int(len(vr)),
           "helps": int(counts.get("helps", 0)), "hurts": int(counts.get("hurts", 0)),
           "none": int(counts.get("no detectable difference", 0)), "variants": []}
    top = vr[(vr.n == nmax) & vr.method.isin(["vrpo", "vrpo-auto"])]
    for _, r in top.sort_values(["kappa", "g", "M", "method"]).iterrows():
        out["variants"].append({"kappa": float(r.kappa), "g": str(r.g), "M": int(r.M), "method": str(r.method),
                                "h2h": [float(r.win_dpo_mean), float(r.win_dpo_lo), float(r.win_dpo_hi)],
                                "verdict": str(r.verdict)})
    return out


def _readings(c, cells: pd.DataFrame, probe_ref: dict, trained: pd.DataFrame) -> list[str]:
    """Computed sentences: kappa = 0 oracle, full mixture, M, biased judge, baselines, length."""
    out = []
    nmax = max(c.ns)
    kmin, kmax = min(c.kappas), max(c.kappas)
    Mmax, Mmin = max(c.Ms), min(c.Ms)

    def cell(k, n, meth, g="-", M=0):
        s = cells[(cells.kappa == k) & (cells.n == n) & (cells.method == meth) & (cells.g == g) & (cells.M == M)]
        return None if s.empty else s.iloc[0]

    pr = pd.DataFrame(probe_ref["rows"])

    def cf(k, g, M):
        s = pr[(pr.kappa == k) & (pr.g == g) & (pr.M == M)]
        return None if s.empty else s.iloc[0]

    if "oracle" in c.all_gs:
        for k, what in ((kmin, f"kappa = {kmin:g} ({'BT in the gold reward' if kmin == 0 else 'the weakest mixture'})"),
                        (kmax, f"kappa = {kmax:g} ({'the full mixture' if kmax == 1 else 'the strongest mixture'})")):
            parts, rows = [], []
            for meth in ("vrpo", "vrpo-auto"):
                for M in sorted(c.Ms):
                    r = cell(k, nmax, meth, "oracle", M)
                    if r is not None:
                        parts.append(f"{LABEL[meth]}, M = {M}: {_verdict_phrase(r)}")
                        rows.append(r)
            if not parts:
                continue
            out.append(f"- **{what}, oracle g, n = {nmax}.** " + "; ".join(parts) + ".")
            if k != 0:
                continue
            differ = [r for r in rows if r.verdict != "no detectable difference"]
            p0 = cf(kmin, "oracle", Mmax)
            if not differ:
                out.append("  At kappa = 0 every oracle-g VRPO variant is indistinguishable from DPO within its "
                           "interval, as the asymptotic theory predicts for a BT preference.")
            else:
                txt = (f"  At kappa = 0 {len(differ)} of {len(rows)} oracle-g VRPO variants differ from DPO "
                       f"({', '.join(f'{LABEL[r.method]} M = {int(r.M)}: {r.verdict}' for r in differ)}), although "
                       f"the gold is BT. The asymptotic no-gain result assumes the fitted BT model is the truth "
                       f"(`s = p*` at `theta*`).")
                if any(r.verdict == "helps" for r in differ) and p0 is not None:
                    txt += (f" Far from `theta*` it does not hold: the gradient-variance ratio VRPO/DPO at `pi_ref` "
                            f"(oracle, M = {Mmax}, lam = 1) is {p0.cf_ratio:.3f} ± {p0.cf_ratio_se:.3f} (closed form), "
                            f"because at `pi_ref` every margin is 0 and the residual `(s - p*) X = (1/2 - p*) X` is as "
                            f"large as `p*` is informative; and the policy class (a small LM's implicit reward) does "
                            f"not contain the gold reward, so the trained policy is not at a BT fit of `p*` either.")
                if any(r.verdict == "hurts" for r in differ):
                    tk = trained[trained.kappa == kmin] if len(trained) else trained
                    if len(tk):
                        nums = ", ".join(f"at the trained {r.policy} {r.ratio:.2f} [{r.ratio_lo:.2f}, "
                                         f"{r.ratio_hi:.2f}]" for r in tk.itertuples())
                        above = bool((tk.ratio_lo > 1).any())
                        txt += (f" Where VRPO is worse: the VRPO/DPO gradient-variance ratio (lam = 1) is {nums}; "
                                + ("the correction adds gradient variance away from `pi_ref`."
                                   if above else "gradient variance at the trained policies does not explain it."))
                    txt += (f" With {c.seeds} seeds per cell, {len(differ)} of {len(rows)} intervals excluding 1/2 "
                            "by chance is not ruled out.")
                out.append(txt)
    if "one-type" in c.all_gs:
        parts = []
        for k in c.kappas:
            for meth in ("vrpo", "vrpo-auto"):
                r = cell(k, nmax, meth, "one-type", Mmax)
                if r is not None:
                    parts.append(f"kappa = {k:g}, {LABEL[meth]}: {_verdict_phrase(r)}")
        if parts:
            out.append(f"- **Biased judge (g = {c.one_type_head} head only), M = {Mmax}, n = {nmax}.** "
                       + "; ".join(parts) + ".")
            r1, ra = cell(kmax, nmax, "vrpo", "one-type", Mmax), cell(kmax, nmax, "vrpo-auto", "one-type", Mmax)
            if r1 is not None and ra is not None and np.isfinite(ra.lam_final_mean):
                out.append(f"  Power tuning ends at lam = {ra.lam_final_mean:.2f} [{ra.lam_final_lo:.2f}, "
                           f"{ra.lam_final_hi:.2f}] for this g (kappa = {kmax:g}).")
    if len(c.Ms) > 1 and "oracle" in c.all_gs:
        parts = []
        for k in c.kappas:
            a, b = cell(k, nmax, "vrpo", "oracle", Mmin), cell(k, nmax, "vrpo", "oracle", Mmax)
            if a is not None and b is not None:
                parts.append(f"kappa = {k:g}: M = {Mmin} {_ci(a.win_dpo_mean, a.win_dpo_lo, a.win_dpo_hi)} vs "
                             f"M = {Mmax} {_ci(b.win_dpo_mean, b.win_dpo_lo, b.win_dpo_hi)}")
            p1, p2 = cf(k, "oracle", Mmin), cf(k, "oracle", Mmax)
            if p1 is not None and p2 is not None:
                parts[-1] += (f" (gradient-variance ratio at pi_ref {p1.cf_ratio:.3f} vs {p2.cf_ratio:.3f}, closed "
                              "form)")
        if parts:
            out.append(f"- **M (VRPO lam = 1, oracle g, n = {nmax}, head to head vs DPO).** " + "; ".join(parts)
                       + ". The bandit theory predicts no gain at M = 1 with lam = 1 and a gain growing with M.")
    parts = []
    for k in c.kappas:
        for b in ("cdpo", "rdpo"):
            r = cell(k, nmax, b)
            if r is not None:
                parts.append(f"kappa = {k:g}, {LABEL[b]}: {_verdict_phrase(r)}")
    if parts:
        out.append(f"- **Label-noise baselines at n = {nmax}.** " + "; ".join(parts) + ".")
    # length / KL: the largest difference from DPO at n_max
    top = cells[(cells.n == nmax)]
    dlen = []
    for _, r in top[top.method != "dpo"].iterrows():
        d = cell(r.kappa, nmax, "dpo")
        if d is not None:
            dlen.append((abs(r.len_tokens_mean - d.len_tokens_mean), r, d))
    if dlen:
        m, r, d = max(dlen, key=lambda t: t[0])
        out.append(f"- **Length.** At n = {nmax} the mean generation length of every method is within {m:.2f} tokens "
                   f"of the same-kappa DPO's (largest: {_variant(r)} at kappa = {r.kappa:g}, "
                   f"{r.len_tokens_mean:.2f} vs {d.len_tokens_mean:.2f}; the cap is {c.max_new_tokens}).")
    if len(trained):
        hi = trained.ratio.max()
        lo = trained.ratio.min()
        out.append(f"- **Gradient variance at trained policies.** VRPO/DPO ratio with lam = 1 between {lo:.2f} and "
                   f"{hi:.2f}; " + ("above 1 at every trained policy probed: away from `pi_ref` DPO's weight "
                                    "`1 - sigma(delta)` shrinks on fitted pairs while the correction does not."
                                    if lo > 1 else "not above 1 everywhere."))
    return out


def _caveats(c, record: dict, cells: pd.DataFrame) -> str:
    pi = record["pi_ref"]
    hs = record["gold"]["heads"]
    return (f"`pi_ref` is a {pi['params']:,}-parameter model trained from scratch (no pretrained weights offline), "
            f"so its samples are barely fluent text and the gold heads (cross-validated accuracy on GPT-3.5 labels "
            f"{hs['helpful']['cv_acc']:.2f} and {hs['harmless']['cv_acc']:.2f}) score them through word-piece "
            f"content and length: the testbed checks the estimator on text with a known preference, not the "
            f"quality of an assistant. Gold win rates are exact expectations estimated by Monte Carlo over "
            f"{record['data']['n_eval']} held-out prompts; the reference bank is shared by all policies, so its "
            f"error is common to every method (differences between methods do not carry it). A seed's labelled "
            f"prompts are drawn with replacement from a finite pool of {record['data']['n_pool']} prompts (the "
            f"population is that pool). {c.seeds} seeds per cell give wide t-intervals; the verdicts are per "
            f"setting, without a multiplicity correction.")


# --------------------------------------------------------------------------- writer


def write_report(cfg, record: dict, agg: dict) -> list[Path]:
    """Figures and the section into ``cfg.out_dir``; copied to ``cfg.publish_dir`` when ``cfg.publish``."""
    out = Path(cfg.out_dir)
    cells, table = agg["cells"], agg["table"]
    probe_ref = json.loads((out / "probe_ref.json").read_text())
    trained = _trained_probes(cfg)
    paths = [out / f for f in FIGURES]
    _fig_win_vs_n(cfg, cells, paths[0])
    _fig_head_to_head(cfg, cells, paths[1])
    _fig_grad_variance(cfg, probe_ref, trained, paths[2])
    _fig_gold(cfg, record, cells, paths[3])
    md = render_section(cfg, record, cells, table, probe_ref, trained)
    sec = out / "llm_regret.md"
    write_text(sec, md)
    written = paths + [sec]
    if cfg.publish:
        pub = Path(cfg.publish_dir)
        for p in paths:
            shutil.copyfile(p, pub / p.name)
        (pub / "sections").mkdir(parents=True, exist_ok=True)
        write_text(pub / "sections" / "llm_regret.md", md)
        written += [pub / p.name for p in paths] + [pub / "sections" / "llm_regret.md"]
        print(f"published {len(paths)} figures and sections/llm_regret.md to {pub}", flush=True)
    return written


def regenerate(cfg) -> list[Path]:
    """Figures and section again from a finished run's files (no training)."""
    from .lm_regret import aggregate

    out = Path(cfg.out_dir)
    path = out / "run.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no finished run here; run `vrpo llm-regret` first")
    record = json.loads(path.read_text())
    if record.get("experiment_key") != cfg.experiment_key():
        raise ValueError(f"{path} holds a run of other settings (experiment key {record.get('experiment_key')}, "
                         f"these settings {cfg.experiment_key()}); pass the same flags as that run")
    return write_report(cfg, record, aggregate(cfg, record))
