"""The figure set's Monte Carlo sweeps and their cache (the data behind F1-F7).

:func:`figure_sweeps` defines the sweeps (one :class:`~sim.config.ExperimentConfig`
each, seed 0); :func:`load_or_run` reads a sweep's results file when its embedded
configuration and code fingerprint match, else runs it; :func:`load_figure_data`
loads every sweep, computes the population theory (:mod:`analysis.theory`) and the
theory-vs-simulation tables (:mod:`analysis.compare`) into a :class:`FigureSet`.
Results are cached under ``<out_dir>/cache``: the sweeps' parquet files (each
carries its resolved configuration) and the theory JSON. The drawing is
:mod:`analysis.figures`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sim.config import ExperimentConfig
from sim.summary import summarize

from .compare import compare_table, sweep_theories

__all__ = ["figure_sweeps", "load_or_run", "load_figure_data", "FigureSet", "m_sweeps_diagnosis", "KAPPA_GRID",
           "G_LADDER", "M_GRID", "REPS", "THEORY_CTX", "MISSPEC", "M_SCEN"]

# Misspecification strengths per scenario (kappa = 0 is BT for all of them).
KAPPA_GRID = {
    "prompt-type": (0.5, 1.0, 2.0),
    "context-mixture": (1.0, 2.0, 4.0),
    "probit": (0.25, 0.5, 1.0),
    "heavy-tail": (0.25, 0.5, 1.0),
    "mixture": (0.5, 1.0, 1.5, 2.0),
    "flip": (0.05, 0.1, 0.2, 0.3),
    "hetero": (0.5, 1.0, 1.5),
    "intransitive": (0.25, 0.5, 1.0),
    "nonlinear": (0.25, 0.5, 1.0),
    "position": (0.5, 1.0, 2.0),
    "ties": (0.5, 1.0, 2.0),
}
# Auxiliary models from best to worst (F3).
G_LADDER = ("oracle", "noisy:0.5", "noisy:1.0", "noisy:2.0", "noisy:4.0", "biased:30", "biased:60", "constant",
            "self", "learned:5")
M_GRID = (1, 2, 4, 8, 16)
REPS = {"main": 200, "kappa": 100, "gquality": 200, "reference": 300, "M": 150}
THEORY_CTX = 10000  # contexts of the figures' theory (jackknife SE reported); validate uses 20000-40000
MISSPEC = "mixture:1.0"  # the misspecified scenario of F1, F3, F5
M_SCEN = "prompt-type:1.0"  # F4: annotator type set by the prompt, so shared and fresh prompts differ


def figure_sweeps(smoke: bool = False, cache_dir="paper_figures/cache", n_jobs: int = 2,
                  progress: bool = True) -> dict[str, ExperimentConfig]:
    """The sweeps behind the figure set, keyed by name (``smoke``: seconds-long versions)."""
    cache_dir = Path(cache_dir)
    base = ExperimentConfig(seed=0, n_jobs=n_jobs, progress=progress, chunk_size=50, n_eval=1000)
    kappa_scen = tuple(f"{s}:{k:g}" for s, ks in KAPPA_GRID.items() for k in ks)
    if smoke:
        base = base.replace(n_pop=2000, n_eval=200, chunk_size=25, n_jobs=1)
        kappa_scen = ("mixture:1", "flip:0.2")
    main_n = (250, 500, 1000, 2000, 4000) if not smoke else (200, 400)
    # Sized for `vrpo figures` <= 3 min on 2 cores from an empty cache ; the high-power,
    # independent theory checks are `vrpo validate`'s job (analysis.validate), not the figures'.
    cfgs = {
        "main": base.replace(name="main", scenarios=("bt", MISSPEC), n=main_n, g=("oracle",),
                             methods=("mle", "vr", "vr-auto"), reps=REPS["main"] if not smoke else 30),
        "kappa": base.replace(name="kappa", scenarios=kappa_scen, n=(1000,) if not smoke else (300,), g=("oracle",),
                              methods=("mle", "vr"), reps=REPS["kappa"] if not smoke else 30),
        "gquality": base.replace(name="gquality", scenarios=(MISSPEC,), n=(1000,) if not smoke else (300,),
                                 g=G_LADDER if not smoke else ("oracle", "noisy:2.0", "biased:60", "constant", "self"),
                                 methods=("mle", "vr", "vr-auto"), reps=REPS["gquality"] if not smoke else 30),
        "reference": base.replace(name="reference", scenarios=(MISSPEC,), scale=10.0, n=(1000,) if not smoke else (300,),
                                  g=("oracle",), methods=("mle", "vr"), reps=REPS["reference"] if not smoke else 30),
    }
    for M in (M_GRID if not smoke else (1, 4)):
        for prompts in ("same", "fresh"):
            nm = f"M{M}-{prompts}"
            cfgs[nm] = base.replace(name=nm, scenarios=(M_SCEN,), n=(1000,) if not smoke else (300,), g=("oracle",),
                                    M=M, aux_prompts=prompts, methods=("mle", "vr", "vr-auto"),
                                    reps=REPS["M"] if not smoke else 30)
    return {k: v.replace(output=str(cache_dir / f"{k}.parquet")) for k, v in cfgs.items()}


def load_or_run(cfg: ExperimentConfig, fresh: bool = False) -> tuple[pd.DataFrame, dict, bool]:
    """Read ``cfg.output`` if it holds this configuration's results, else run the sweep.

    Returns ``(df, meta, from_cache)``. A file whose embedded configuration differs
    (in any result-changing field) or whose code fingerprint differs
    (:func:`sim.runner.code_fingerprint`, per scenario) is recomputed, resuming
    from the cell cache (keyed by configuration and code, so only cells whose code
    changed are rerun).
    """
    from sim.runner import code_fingerprint, read_results, run_experiment

    out = Path(cfg.output)
    if out.exists() and not fresh:
        df, meta = read_results(out)
        old = meta.get("config", {})
        code = {s: code_fingerprint(cfg, s) for s in cfg.scenarios}
        if ExperimentConfig.from_dict(old).identity() == cfg.identity() and meta.get("code_fingerprint") == code:
            return df, meta, True
    run_experiment(cfg, resume=not fresh)
    df, meta = read_results(out)
    return df, meta, False


@dataclass
class FigureSet:
    """Everything the report needs: configs, results (``frames``), summaries, comparison tables,
    figures, timings and derived data (``data``)."""

    out_dir: Path
    smoke: bool
    configs: dict
    metas: dict
    summaries: dict
    tables: dict
    theories: dict
    figures: list = field(default_factory=list)  # dicts: id, title, paths, caption, sweeps
    timings: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    frames: dict = field(default_factory=dict)

    @property
    def compare(self) -> pd.DataFrame:
        return pd.concat([t.assign(sweep=k) for k, t in self.tables.items()], ignore_index=True)


def m_sweeps_diagnosis(fs: FigureSet) -> dict | None:
    """Why the F4 points sit together on one side of the theory, computed from the replications.

    The ``M<M>-*`` sweeps share seed, bandit and scenario, so they draw the *same labelled data*
    (``analysis.compare.shared_data_groups``): their MLE rows are one sample, and their VR fits
    share the labelled part of the score. Returns the MLE's ``z`` (n tr Cov vs tr V), each VR
    cell's ``z``, and the median correlation of the VR cells' per-replication squared errors
    across M (and with the MLE's), per prompt design.
    """
    from sim.summary import theta_cols
    from vrpo_common.stats import sq_dev

    names = [k for k in fs.tables if k.startswith("M") and k[1:].split("-")[0].isdigit()]
    if not names:
        return None
    out = {"designs": {}}
    mle_z = None
    for design in ("same", "fresh"):
        cells = sorted([k for k in names if k.endswith("-" + design)], key=lambda k: int(k[1:].split("-")[0]))
        if not cells:
            continue
        D, zs = [], []
        for k in cells:
            df, tab = fs.frames[k], fs.tables[k]
            tc = theta_cols(df)
            vr = df[(df["method"] == "vr")].sort_values("rep")
            D.append(sq_dev(vr[tc].to_numpy()))
            zs.append(float(tab[tab["method"] == "vr"]["z_cov"].iloc[0]))
            mle = df[df["method"] == "mle"].sort_values("rep")
            Dm = sq_dev(mle[tc].to_numpy())
            mle_z = float(tab[tab["method"] == "mle"]["z_cov"].iloc[0])
        C = np.corrcoef(np.stack(D))
        off = C[np.triu_indices(len(D), 1)]
        out["designs"][design] = {
            "M": [int(k[1:].split("-")[0]) for k in cells], "vr_z": zs,
            "corr_vr_median": float(np.median(off)) if off.size else float("nan"),
            "corr_vr_mle_median": float(np.median([np.corrcoef(d, Dm)[0, 1] for d in D])),
        }
    out["mle_z"] = mle_z
    return out


def _win_star(cfg: ExperimentConfig, meta: dict) -> dict:
    """Win rate of ``pi_theta*`` over ``pi_ref`` on the runner's evaluation contexts (F5's limit line)."""
    from sim.bandit import Bandit
    from sim.policy import log_policy_linear, win_rate
    from sim.scenarios import make_scenario

    from .compare import eval_contexts

    out = {}
    for s in cfg.scenarios:
        ev = eval_contexts(cfg, s)
        scen = make_scenario(s, Bandit(cfg.bandit_spec))
        P = scen.p_star(ev.x[:, None, None, :], ev.phi[:, :, None, :], ev.phi[:, None, :, :])
        lp = log_policy_linear(np.asarray(meta["theta_star"][s])[None], ev.phi, ev.log_pi_ref, cfg.beta)[0]
        out[s] = float(win_rate(lp, ev.log_pi_ref, P))
    return out


def load_figure_data(out_dir="paper_figures", *, smoke: bool = False, n_jobs: int = 2, progress: bool = True,
                     fresh: bool = False, n_ctx: int | None = None, sweeps: set | None = None,
                     lam1: bool = True) -> FigureSet:
    """Run (or read) the sweeps, compute the theory and the comparison tables; no drawing.

    ``n_ctx``: contexts of the theory's sample (default :data:`THEORY_CTX`; 2000 for
    ``smoke``). ``sweeps``: names of :func:`figure_sweeps` to load (default all);
    ``lam1``: also the finite-sample study of ``lam = 1`` (F7).
    """
    out_dir = Path(out_dir)
    cache = out_dir / "cache"
    n_ctx = n_ctx or (2000 if smoke else THEORY_CTX)
    cfgs = figure_sweeps(smoke, cache, n_jobs, progress)
    if sweeps is not None:
        cfgs = {k: v for k, v in cfgs.items() if k in sweeps}
    fs = FigureSet(out_dir=out_dir, smoke=smoke, configs=cfgs, metas={}, summaries={}, tables={}, theories={})
    t0 = time.time()
    cached = []
    for name, cfg in cfgs.items():
        ts = time.time()
        df, meta, hit = load_or_run(cfg, fresh=fresh)
        cached.append(hit)
        fs.timings[f"sweep:{name}"] = time.time() - ts
        fs.metas[name] = meta
        fs.frames[name] = df
        fs.summaries[name] = summarize(df)
        ts = time.time()
        th, G_eval = sweep_theories(cfg, meta, n_ctx=n_ctx, n_batches=20, cache_dir=cache / "theory")
        fs.theories[name] = th
        fs.tables[name] = compare_table(df, cfg, th, G_eval)
        fs.timings[f"theory:{name}"] = time.time() - ts
        if name == "gquality":
            auto = df[(df["g"] == "self") & (df["method"] == "vr-auto")]["lam"]
            fs.data["self_auto_lam"] = float(auto.mean()) if len(auto) else None
        if name == "main":
            fs.data["win_star"] = _win_star(cfg, meta)
    if lam1:
        from .finite_sample import Lam1Config, lam1_cached

        ts = time.time()
        lcfg = Lam1Config(reps=1000 if not smoke else 60, ns=(25, 50, 100, 200, 400) if not smoke else (25, 100),
                          gs=Lam1Config.gs if not smoke else ("oracle", "noisy:4.0", "constant"),
                          n_pop=40000 if not smoke else 4000)
        fs.data["lam1"], hit = lam1_cached(lcfg, cache / "lam1.parquet", fresh=fresh, progress=progress)
        fs.data["lam1_config"] = lcfg
        cached.append(hit)
        fs.timings["study:lam1"] = time.time() - ts
    # VR with the self g equals the MLE: checked from theta = 0 by an independent solver (not from the MLE)
    from .validate import self_g_identity

    ts = time.time()
    fs.data["self_g"] = self_g_identity(reps=5 if smoke else 20)
    fs.timings["self_g"] = time.time() - ts
    fs.data["m_diagnosis"] = m_sweeps_diagnosis(fs)
    fs.timings["sweeps_and_theory"] = time.time() - t0
    fs.data["all_cached"] = all(cached)
    return fs
