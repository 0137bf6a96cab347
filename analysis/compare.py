"""Theory vs simulation (docs/method.md sections 3-4): one row per scenario x method x g x n.

For each cell of a Monte Carlo sweep this puts side by side

- ``n tr Cov(theta_hat)`` (simulated, with MC SE) and ``tr V`` (theory, with its
  context-sample jackknife SE),
- ``n E[regret]`` and ``tr(G V) / (2 beta)``,
- the VR/MLE ratios of both (simulated: paired over common replications, delta-method
  SE; predicted: jackknife SE),
- CI coverage (nominal ``1 - alpha``), and the fitted vs optimal ``lam``,

and flags each comparison whose difference exceeds ``Z_FLAG`` combined standard errors.

The theory is evaluated at the simulation's own ``theta*`` (stored in the results
file), and ``G`` on the simulation's evaluation contexts, so the simulated regret and
its theory line average over the same contexts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sim.config import ExperimentConfig
from sim.summary import summarize, theta_cols

from sim.runner import eval_contexts  # re-exported: the runner's evaluation contexts

from vrpo_common.stats import holm, mean_se, p_two_sided, paired_ratio, sq_dev, z_score

from .theory import PopulationTheory, policy_G, theory_cached

__all__ = ["Z_FLAG", "eval_contexts", "sweep_theories", "compare_table", "agreement_summary", "holm_table",
           "shared_data_groups"]

Z_FLAG = 3.0


def sweep_theories(cfg: ExperimentConfig, meta: dict, *, n_ctx: int = 20000, n_batches: int = 20,
                   cache_dir=None) -> tuple[dict, dict]:
    """Theory for every scenario x g of a sweep, at the sweep's ``theta*``.

    Returns ``({(scenario, g): PopulationTheory}, {scenario: G_eval})``; ``G_eval`` is
    ``G`` on the runner's evaluation contexts (what the simulated regret averages over).
    """
    gs = list(cfg.g) or ["oracle"]
    theories, G_eval = {}, {}
    for s in cfg.scenarios:
        th = np.asarray(meta["theta_star"][s])
        se = np.asarray(meta["theta_star_se"][s])
        res = theory_cached(cfg.bandit_spec, s, gs, cfg.M, cfg.aux_prompts, n_ctx, n_batches, cache_dir=cache_dir,
                            theta_star=(th, se))
        for g, t in res.items():
            theories[(s, g)] = t
        ev = eval_contexts(cfg, s)
        G_eval[s] = policy_G(th, ev.phi, ev.log_pi_ref, cfg.beta)
    return theories, G_eval


def compare_table(df: pd.DataFrame, cfg: ExperimentConfig, theories: dict, G_eval: dict) -> pd.DataFrame:
    """The theory-vs-simulation table of one sweep (module docstring); one row per cell.

    Columns ``*_sim``/``*_sim_se`` (Monte Carlo), ``*_th``/``*_th_se`` (theory),
    ``z_*`` (difference in combined SEs) and ``flag_*`` (``|z| > Z_FLAG``).
    """
    summ = summarize(df)
    tc = theta_cols(df)
    rows = []
    for r in summ.itertuples(index=False):
        s, g, method, n = r.scenario, r.g, r.method, int(r.n)
        t: PopulationTheory = theories.get((s, g)) or next(v for (ss, _), v in theories.items() if ss == s)
        lam = t.lam(method)
        G = G_eval.get(s, t.G)
        row = {"scenario": s, "kappa": r.kappa, "g": g, "method": method, "n": n, "M": cfg.M,
               "aux_prompts": cfg.aux_prompts, "reps": r.reps, "nonconverged": r.nonconverged}
        row.update(ntrcov_sim=r.ntrcov, ntrcov_sim_se=r.ntrcov_se, trV_th=t.trV(lam), trV_th_se=t.trV_se(method))
        row["z_cov"] = z_score(row["ntrcov_sim"], row["ntrcov_sim_se"], row["trV_th"], row["trV_th_se"])
        row.update(nregret_sim=n * r.regret, nregret_sim_se=n * r.regret_se,
                   regret_const_th=float(np.trace(G @ t.V(lam)) / (2 * cfg.beta)),
                   regret_const_th_se=t.regret_const_se(method))
        row["z_regret"] = z_score(row["nregret_sim"], row["nregret_sim_se"], row["regret_const_th"], row["regret_const_th_se"])
        row.update(coverage_sim=r.cover_frac, coverage_sim_se=r.cover_frac_se, coverage_nominal=1 - cfg.alpha)
        # mean sandwich estimate n tr Cov_hat (its ratio to the simulated n tr Cov explains coverage errors)
        sel = df[(df.scenario == s) & (df.n == n) & (df.g == g) & (df.method == method) & df.converged.astype(bool)]
        se_cols = [c.replace("theta_", "se_") for c in tc]
        row["trV_sandwich"], row["trV_sandwich_se"] = mean_se(n * np.sum(sel[se_cols].to_numpy() ** 2, axis=1))
        row["z_coverage"] = z_score(r.cover_frac, r.cover_frac_se, 1 - cfg.alpha, 0.0)
        row.update(lam_sim=r.lam, lam_sim_se=r.lam_se, lam_th=lam)
        # paired VR/MLE ratios over replications where both fits converged
        if method != "mle" and "mle" in set(summ.method):
            cell = df[(df.scenario == s) & (df.n == n)]
            a = cell[(cell.g == g) & (cell.method == method)].set_index("rep")
            b = cell[cell.method == "mle"].set_index("rep")
            ok = a.index.intersection(b.index)
            ok = ok[a.loc[ok, "converged"].to_numpy(bool) & b.loc[ok, "converged"].to_numpy(bool)]
            a, b = a.loc[ok], b.loc[ok]
            row["var_ratio_sim"], row["var_ratio_sim_se"] = paired_ratio(sq_dev(a[tc].to_numpy()), sq_dev(b[tc].to_numpy()))
            row["regret_ratio_sim"], row["regret_ratio_sim_se"] = paired_ratio(a["regret"], b["regret"])
            G0 = float(np.trace(G @ t.V(0.0)))
            row.update(var_ratio_th=t.trV(lam) / t.trV(0.0), var_ratio_th_se=t.ratio_se(method, "trV"),
                       regret_ratio_th=float(np.trace(G @ t.V(lam))) / G0, regret_ratio_th_se=t.ratio_se(method, "G"))
            row["z_var_ratio"] = z_score(row["var_ratio_sim"], row["var_ratio_sim_se"], row["var_ratio_th"],
                                    row["var_ratio_th_se"])
            row["z_regret_ratio"] = z_score(row["regret_ratio_sim"], row["regret_ratio_sim_se"], row["regret_ratio_th"],
                                       row["regret_ratio_th_se"])
        rows.append(row)
    out = pd.DataFrame(rows)
    for z in [c for c in out.columns if c.startswith("z_")]:
        out["flag_" + z[2:]] = out[z].abs() > Z_FLAG
        out["p_" + z[2:]] = p_two_sided(out[z].to_numpy(float))
    return out


def holm_table(table: pd.DataFrame, n_min: int = 1000, alpha: float = 1e-3) -> pd.DataFrame:
    """Long form of the comparisons at ``n >= n_min``: one row per cell x check with ``z``, ``p``,
    Holm-adjusted ``p_holm`` over all of them and ``rejected`` at family-wise ``alpha``."""
    sub = table[table["n"] >= n_min]
    parts = []
    for c in CHECKS:
        if f"z_{c}" not in sub:
            continue
        t = sub[np.isfinite(sub[f"z_{c}"].to_numpy(float))].copy()
        t["check"], t["z"], t["p"] = c, t[f"z_{c}"], t[f"p_{c}"]
        parts.append(t)
    long = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["check", "z", "p"])
    long["p_holm"] = holm(long["p"].to_numpy(float)) if len(long) else []
    long["rejected"] = long["p_holm"] <= alpha
    return long


CHECKS = ("cov", "regret", "var_ratio", "regret_ratio", "coverage")


def agreement_summary(table: pd.DataFrame, n_min: int = 1000) -> pd.DataFrame:
    """Per check: cells at ``n >= n_min`` compared, how many within ``Z_FLAG`` SEs, and the share."""
    sub = table[table["n"] >= n_min]
    rows = []
    for c in CHECKS:
        if f"z_{c}" not in sub:
            continue
        z = sub[f"z_{c}"].dropna()
        within = int((z.abs() <= Z_FLAG).sum())
        rows.append({"check": c, "cells": len(z), "within": within, "share": within / len(z) if len(z) else np.nan})
    return pd.DataFrame(rows)


def shared_data_groups(configs: dict) -> dict:
    """Sweeps whose cells draw the same labelled data: same seed, bandit and scenario string (the
    runner seeds replication ``r`` of ``(scenario, n)`` by ``(seed, crc32(scenario), n, r)`` and draws
    the labelled pairs before the extra pairs, so ``M`` and the prompt design do not change them).
    Returns ``{(sweep, scenario): [other sweeps sharing it at some common n]}``."""
    out = {}
    for a, ca in configs.items():
        for s in ca.scenarios:
            key = (ca.seed, ca.d, ca.K, ca.dx, ca.scale, ca.beta, ca.pi_ref, s)
            others = [b for b, cb in configs.items() if b != a and s in cb.scenarios and set(cb.n) & set(ca.n)
                      and (cb.seed, cb.d, cb.K, cb.dx, cb.scale, cb.beta, cb.pi_ref, s) == key]
            out[(a, s)] = others
    return out
