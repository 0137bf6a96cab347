"""The finite-sample side of ``lam = 1``.

At ``lam = 1`` the labelled pairs carry none of the curvature of ``L_VR`` (their rows have
weight ``1 - lam``), so the objective is the BT loss of the *extra* pairs' ``g`` plus a
linear tilt by the labelled correction ``-(Z - g) X``. With a poor ``g`` or few pairs the
tilt can point along a direction in which the extra pairs' loss is flat: the objective
is unbounded below, ``fit_bt`` reports ``converged = False`` and every summary leaves the
replication out. This module measures

- how often that happens, as a function of ``n`` and of ``g``'s quality (with the BT-MLE's
  own separation rate beside it);
- the bias of what is left: the mean VR estimate over converged replications against
  ``theta*`` (in units of its standard deviation; the noise of the mean is removed from
  the norm, ``|b_hat|^2 - tr Cov / R``), and the *selection* effect alone, read
  off the MLE twins: ``mean(MLE | VR converged) - mean(MLE)`` in units of the MLE's SD (the
  MLE exists on every replication where it converges, so this isolates what dropping
  replications does to an estimator).

All ``g`` share each replication's data (common random numbers, intended: the rates are
compared across ``g`` on the same samples); each ``g`` has its own noise stream.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

import vrpo
from sim.aux_models import make_aux
from sim.bandit import Bandit, BanditSpec
from sim.data import PairData, sample_pairs
from sim.population import theta_star
from sim.scenarios import make_scenario

__all__ = ["Lam1Config", "run_lam1_study", "lam1_cached"]

_STREAM = 0x1A31


def _crc(s: str) -> int:
    return zlib.crc32(s.encode())


@dataclass(frozen=True)
class Lam1Config:
    """The ``lam = 1`` finite-sample study: one bandit instance, a ladder of ``g`` and of ``n``."""

    scenario: str = "mixture:1.0"
    spec: BanditSpec = field(default_factory=lambda: BanditSpec(seed=0))
    gs: tuple = ("oracle", "noisy:1.0", "noisy:2.0", "noisy:4.0", "biased:30", "biased:60", "constant")
    ns: tuple = (25, 50, 100, 200, 400)
    reps: int = 1000
    M: int = 4
    n_pop: int = 40000
    seed: int = 0

    def identity(self) -> dict:
        d = asdict(self)
        d["gs"], d["ns"] = list(self.gs), list(self.ns)
        return d


def _rng(cfg, n, r, stream):
    return np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(_crc(cfg.scenario), _STREAM, n, r,
                                                                                stream)))


def _shift(th, keep, base):
    """Largest standardised coordinate shift of ``mean(th[keep])`` from ``mean(th[base])`` (nested sets),
    and its size in SD units ``|diff| / sqrt(tr Cov)``; NaN when nothing is left out."""
    k, a = int((keep & base).sum()), int(base.sum())
    if k == a or k < 3:
        return float("nan"), float("nan")
    sd = np.std(th[base], axis=0, ddof=1)
    diff = th[keep & base].mean(axis=0) - th[base].mean(axis=0)
    z = float(np.max(np.abs(diff) / (sd * math.sqrt(1.0 / k - 1.0 / a))))
    return z, float(np.linalg.norm(diff) / np.sqrt(np.sum(sd**2)))


def run_lam1_study(cfg: Lam1Config = Lam1Config(), progress: bool = False) -> pd.DataFrame:
    """One row per ``(n, g)``: non-convergence rates of VR (``lam = 1``) and of the MLE with binomial
    SEs, the conditional bias of VR, and the selection shift of the MLE twins (module docstring)."""
    from tqdm.auto import tqdm

    bandit = Bandit(cfg.spec)
    scen = make_scenario(cfg.scenario, bandit)
    pop_rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(_crc(cfg.scenario), _STREAM)))
    th_star, th_se = theta_star(scen, bandit.sample_contexts(pop_rng, cfg.n_pop))
    rows = []
    for n in tqdm(cfg.ns, desc="lam=1 study", disable=not progress):
        data = PairData.stack([sample_pairs(_rng(cfg, n, r, 0), bandit, scen, n, cfg.M) for r in range(cfg.reps)])
        mle = vrpo.fit_bt(data.X, data.Z, lam=0, warn=False)
        mc = np.asarray(mle.converged, bool)
        for g_spec in cfg.gs:
            g, ga = make_aux(g_spec, scen)(data, [_rng(cfg, n, r, 1 + _crc(g_spec)) for r in range(cfg.reps)])
            vr = vrpo.fit_bt(data.X, data.Z, g, data.X_aux, ga, lam=1.0, warn=False)
            vc = np.asarray(vr.converged, bool)
            p, p0 = float(np.mean(~vc)), float(np.mean(~mc))
            th = vr.theta[vc]
            b = th.mean(axis=0) - th_star
            sd = th.std(axis=0, ddof=1)
            bm = mle.theta[mc].mean(axis=0) - th_star
            sdm = mle.theta[mc].std(axis=0, ddof=1)
            # |bias| with the noise of the mean removed: |b_hat|^2 - sum_j sd_j^2 / R (then clipped at 0)
            nb = math.sqrt(max(float(b @ b - np.sum(sd**2) / len(th)), 0.0))
            nbm = math.sqrt(max(float(bm @ bm - np.sum(sdm**2) / mc.sum()), 0.0))
            sel_z, sel_sd = _shift(mle.theta, vc, mc)
            rows.append({
                "scenario": cfg.scenario, "g": g_spec, "n": n, "reps": cfg.reps,
                "nc_vr": p, "nc_vr_se": math.sqrt(max(p * (1 - p), 1.0 / cfg.reps) / cfg.reps),
                "nc_mle": p0, "nc_mle_se": math.sqrt(max(p0 * (1 - p0), 1.0 / cfg.reps) / cfg.reps),
                "bias_vr_sd": nb / float(np.sqrt(np.sum(sd**2))),
                "bias_vr_z": float(np.max(np.abs(b) / (sd / math.sqrt(len(th))))),
                "bias_mle_sd": nbm / float(np.sqrt(np.sum(sdm**2))),
                "selection_z": sel_z, "selection_sd": sel_sd,
                "theta_star_se_max": float(np.max(th_se)),
            })
    return pd.DataFrame(rows)


def lam1_cached(cfg: Lam1Config, path, fresh: bool = False, progress: bool = False) -> tuple[pd.DataFrame, bool]:
    """Read the study from ``path`` (parquet, its config embedded) if it holds ``cfg``'s results, else run it."""
    from sim.runner import read_results, write_table

    path = Path(path)
    if path.exists() and not fresh:
        df, meta = read_results(path)
        if meta.get("config") == json.loads(json.dumps(cfg.identity())):
            return df, True
    df = run_lam1_study(cfg, progress=progress)
    write_table(df, path, {"config": cfg.identity()})
    return df, False
