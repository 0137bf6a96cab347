"""``vrpo validate``: a validation of the theory that can fail.

What it does
------------
1. **Independent, high-power cells.** A *cell* is one bandit instance (``BanditSpec`` with
   its own seed, so its own ``theta_0``, annotator types and prompt weights) x scenario x
   auxiliary model ``g`` x ``M`` x prompt design x ``n``, simulated with ``reps``
   replications from its own seed stream ``SeedSequence(seed, spawn_key=(crc32(cell
   name), rep, stream))``. No two cells share data. *Within* a cell every method
   (BT-MLE, VR at fixed ``lam``, VR-auto) is fitted on the same data: the VR/MLE ratios
   are paired on purpose (common random numbers, delta-method SE over the pairs).
2. **Checks.** Each check compares one simulated statistic (with its Monte Carlo SE)
   with the population theory of :mod:`analysis.theory` (with its jackknife SE):
   ``z = (sim - pred) / sqrt(se_sim^2 + se_pred^2)``, two-sided normal p-value. The
   correct theory's checks form one family, corrected by Holm at family-wise level
   :data:`ALPHA_FW`.
3. **Mutants** (:mod:`analysis.mutants`): the same statistics against deliberately
   wrong theories or estimators. A mutant is *killed* when at least one of its checks
   is rejected by Holm at :data:`ALPHA_KILL` within the mutant family; the effect of each
   is reported in SE units (``z``).
4. **Diagnoses** of every flagged correct check (``|z| > 3`` or rejected after Holm),
   computed from the cell's own numbers (numerator vs denominator of a ratio, the
   finite-sample excess across ``n``, the sandwich's calibration, non-converged fits,
   the same check on the other instances).

The run fails (:func:`exit_code` 1) when a correct check is rejected after Holm, a mutant
survives, or an identity check fails. Quick mode is what CI runs; the default mode adds
instances, scenarios, poor auxiliary models and ``n`` ladders whose ``1/n`` extrapolation
separates the asymptotic constant from the finite-sample excess.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import zlib
from dataclasses import asdict, dataclass, replace
from typing import Literal
from pathlib import Path

import numpy as np

import vrpo
from sim.aux_models import make_aux
from sim.bandit import Bandit, BanditSpec
from sim.data import PairData, sample_pairs
from sim.policy import log_policy_linear, regret
from sim.scenarios import make_scenario
from vrpo_common.fileio import write_json
from vrpo_common.stats import (Z95, delta_se, extrapolate_inv_n, holm, holm_threshold, mean_se, p_two_sided,
                               paired_ratio, sq_dev, trace_cov_se, z_score)

from .mutants import MUTANTS, cov_labelled_hessian, cov_unclustered, model_based_trV, naive_lam, theory_mutant
from .theory import PopulationTheory, policy_G, theory_cached

__all__ = ["ALPHA_FW", "ALPHA_KILL", "Z_FLAG", "Cell", "Plan", "make_plan", "run_validation", "format_table",
           "exit_code", "render_markdown", "VALIDATE_VERSION"]

#: family-wise level of the correct-theory family (Holm): P(any false rejection) <= 1e-3
ALPHA_FW = 1e-3
#: a mutant check rejects when its Holm-adjusted p-value (mutant family) is below this
ALPHA_KILL = 1e-3
#: raw flag for the diagnoses (and the expected count beside the observed one)
Z_FLAG = 3.0
NOMINAL = 0.95
VALIDATE_VERSION = 1
_EVAL_STREAM = 0xE7A1


def _crc(s: str) -> int:
    return zlib.crc32(s.encode())


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Cell:
    """One independent Monte Carlo cell (module docstring).

    ``lams``: the fixed ``lam`` fitted (``0`` is the MLE, always fitted); ``auto``: also
    VR-auto; ``checks``: which statistics of the correct theory this cell feeds
    (``ratio``, ``coverage``, ``sandwich``, ``lam``, ``level``); ``mutants``: the mutants
    (:data:`analysis.mutants.MUTANTS`) evaluated on this cell's statistics. Regret is
    computed when ``ratio`` or ``level`` is listed.
    """

    name: str
    spec: BanditSpec
    scenario: str
    n: int
    reps: int
    g: str = "oracle"
    M: int = 4
    aux_prompts: Literal["same", "fresh"] = "same"
    lams: tuple = (0.0, 1.0)
    auto: bool = True
    checks: tuple = ("ratio",)
    mutants: tuple = ()

    @property
    def methods(self) -> list[str]:
        return ["mle"] + [f"vr:{lam:g}" for lam in self.lams if lam > 0] + (["vr-auto"] if self.auto else [])

    @property
    def needs_g(self) -> bool:
        return any(lam > 0 for lam in self.lams) or self.auto

    @property
    def needs_regret(self) -> bool:
        return "ratio" in self.checks or "level" in self.checks

    @property
    def design(self) -> tuple:
        """Cells that differ only in ``n`` share a design (an ``n`` ladder)."""
        return (self.spec, self.scenario, self.g, self.M, self.aux_prompts, self.lams, self.auto)

    def identity(self) -> dict:
        d = asdict(self)
        d["spec"] = asdict(self.spec)
        d["lams"] = list(self.lams)
        d["checks"] = list(self.checks)
        d["mutants"] = list(self.mutants)
        return d


@dataclass(frozen=True)
class Plan:
    """All cells of one validation run and the theory's settings."""

    mode: str
    seed: int
    cells: tuple
    n_ctx: int = 20000
    n_batches: int = 20
    n_eval: int = 1000
    selfg_reps: int = 20

    def identity(self) -> dict:
        return {"mode": self.mode, "seed": self.seed, "n_ctx": self.n_ctx, "n_batches": self.n_batches,
                "n_eval": self.n_eval, "selfg_reps": self.selfg_reps, "version": VALIDATE_VERSION,
                "cells": [c.identity() for c in self.cells]}


def _spec(seed, d=4, scale=6.0, K=8, dx=4) -> BanditSpec:
    return BanditSpec(d=d, K=K, dx=dx, scale=scale, beta=1.0, pi_ref="uniform", seed=seed)


def _cell(kind, spec, scenario, n, reps, **kw) -> Cell:
    g, M, ap = kw.get("g", "oracle"), kw.get("M", 4), kw.get("aux_prompts", "same")
    name = (f"{kind}/{scenario}/d{spec.d}-K{spec.K}-scale{spec.scale:g}-seed{spec.seed}/{g}/M{M}-{ap}/n{n}")
    return Cell(name=name, spec=spec, scenario=scenario, n=n, reps=reps, **kw)


def make_plan(mode: str = "quick", seed: int = 0, reps_scale: float = 1.0) -> Plan:
    """The cells of ``quick`` (CI) or ``default`` mode.

    ``reps_scale`` multiplies every cell's replications (tests use small values; the
    verdicts are only meaningful at 1).
    """
    if mode not in ("quick", "default"):
        raise ValueError(f"mode must be 'quick' or 'default', got {mode!r}")
    R = lambda r: max(40, int(round(r * reps_scale)))  # noqa: E731
    quick = mode == "quick"
    seeds = (1, 2) if quick else (1, 2, 3, 4, 5)
    cells = []
    # (1) the prompt-type family: shared vs fresh prompts, oracle g: ratios and coverage at n = 1000
    fam = ("prompt-type:1.0",) if quick else ("prompt-type:1.0", "context-mixture:2.0")
    for s in fam:
        for sd in seeds:
            for ap in ("same", "fresh"):
                cells.append(_cell("design", _spec(sd), s, 1000, R(2000), aux_prompts=ap, checks=("ratio", "coverage"),
                                   mutants=("no-1/M", "wrong-prompts") + (("unclustered",) if ap == "same" else ())))
    # (2) lam*: clustered vs naive PPI++, non-oracle g, lam grid {0, 1/2, 1}
    lam_cases = [("hetero:2.0", "noisy:2.0", 10.0)] + ([] if quick else [("prompt-type:1.0", "noisy:4.0", 3.0)])
    for s, g, scale in lam_cases:
        for sd in (seeds[:1] if quick else seeds[:3]):
            # default mode: hetero's lam argmin sits about 0.02 below lam* at n = 500 in every instance (a
            # finite-sample effect), so it is extrapolated over n = 500, 1000
            for n in ((500, 1000) if not quick and s.startswith("hetero") else (500,)):
                cells.append(_cell("lam", _spec(sd, scale=scale), s, n, R(6000), g=g, lams=(0.0, 0.5, 1.0),
                                   auto=False, checks=("lam",), mutants=("naive-lam",)))
    # (3) the sandwich's bread: labelled-only Hessian at small n / d, many extra pairs (M = 16)
    for sd in (seeds[:1] if quick else seeds[:3]):
        cells.append(_cell("sandwich", _spec(sd, d=8), "prompt-type:1.0", 150, R(3000), g="noisy:1.0", M=16,
                           auto=False, checks=("sandwich",), mutants=("labelled-hessian",)))
    # (4) levels n tr Cov vs tr V and n E[regret] vs tr(G V)/(2 beta). A single n carries an O(1/n)
    # excess of a few percent, so quick mode uses one large n for the MLE only; default mode
    # extrapolates n = 500, 1000, 2000 ladders to n -> infinity for every method.
    if quick:
        for s, mut, sds in (("prompt-type:1.0", ("G-ref",), seeds), ("ties:2.0", ("model-based",), seeds[:1])):
            for sd in sds:
                cells.append(_cell("level", _spec(sd), s, 2000, R(1000), M=1, lams=(0.0,), auto=False,
                                   checks=("level",), mutants=mut))
    else:
        for s in ("prompt-type:1.0", "mixture:1.0"):
            for sd in seeds[:3]:
                for n in (500, 1000, 2000):
                    cells.append(_cell("level", _spec(sd), s, n, R(2000), checks=("level",),
                                       mutants=("G-ref", "model-based")))
        for sd in seeds[:3]:
            for n in (1000, 2000):
                cells.append(_cell("level", _spec(sd), "ties:2.0", n, R(2000), M=1, lams=(0.0,), auto=False,
                                   checks=("level",), mutants=("model-based",)))
    if not quick:
        # (5) the rest of the zoo, oracle g, shared prompts
        for s in ("bt", "mixture:1.0", "intransitive:1.0", "nonlinear:1.0", "hetero:1.0"):
            for sd in seeds[:3]:
                # under BT the VR-MLE difference is itself O(1/n) (the oracle correction vanishes at
                # theta*), and the paired ratios are precise enough to resolve it at one n: an n ladder
                for n in ((1000, 2000, 4000) if s == "bt" else (1000,)):
                    cells.append(_cell("zoo", _spec(sd), s, n, R(2000), checks=("ratio", "coverage"),
                                       mutants=() if s == "bt" else ("no-1/M",)))
        # (6) poor g: lam = 1 hurts, VR-auto must not
        for g in ("noisy:2.0", "biased:60", "constant"):
            for sd in seeds[:3]:
                # with a poor g, VR at lam = 1 converges slowly (its variance is 1.7-2.3x the MLE's): the two
                # worst g get an n ladder so that the comparison is made at n -> infinity
                for n in ((1000, 2000) if g != "noisy:2.0" else (1000,)):
                    cells.append(_cell("poor-g", _spec(sd), "mixture:1.0", n, R(2000), g=g, checks=("ratio",)))
        # (7) M: the 1/M factor is largest at small M
        for M in (1, 2, 16):
            for sd in seeds[:3]:
                cells.append(_cell("M", _spec(sd), "prompt-type:1.0", 1000, R(2000), M=M, checks=("ratio",),
                                   mutants=("no-1/M", "wrong-prompts")))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise AssertionError("cell names must be unique (they seed the cells)")
    # theta*'s Monte Carlo error enters n E[regret] as n tr(G Cov(theta*_hat)) / (2 beta): 20000 (40000)
    # contexts keep it below about 1% (0.5%) of the regret constant at n = 2000
    return Plan(mode=mode, seed=seed, cells=tuple(cells), n_ctx=20000 if quick else 40000, n_batches=20)


# --------------------------------------------------------------------------- theory


class _Theories:
    """Population theory per (instance, scenario, g), variants for (M, prompts), cached on disk."""

    def __init__(self, plan: Plan, cache_dir):
        self.plan = plan
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._base: dict = {}
        self._eval: dict = {}

    def get(self, spec, scenario, g, M=4, aux_prompts="same") -> PopulationTheory:
        key = (spec, scenario, g)
        if key not in self._base:
            self._base[key] = theory_cached(spec, scenario, [g], 4, "same", self.plan.n_ctx, self.plan.n_batches,
                                            cache_dir=self.cache_dir)[g]
        th = self._base[key]
        return th if (M, aux_prompts) == (4, "same") else th.variant(M=M, aux_prompts=aux_prompts)

    def theta_star(self, spec, scenario) -> np.ndarray:
        """``theta*`` of the instance (fitted on the theory's own contexts; the same for every ``g``)."""
        for (sp, sc, _), th in self._base.items():
            if (sp, sc) == (spec, scenario):
                return th.theta_star
        return self.get(spec, scenario, "oracle").theta_star

    def eval_set(self, spec, scenario) -> dict:
        """Evaluation contexts of the regret (seeded by the instance and scenario), with ``G``
        under ``pi_theta*`` and under ``pi_ref`` on them."""
        key = (spec, scenario)
        if key not in self._eval:
            bandit = Bandit(spec)
            rng = np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(_crc(scenario), _EVAL_STREAM)))
            ev = bandit.sample_contexts(rng, self.plan.n_eval)
            th = self.theta_star(spec, scenario)
            self._eval[key] = {
                "phi": ev.phi, "log_pi_ref": ev.log_pi_ref,
                "log_pi_star": log_policy_linear(th[None], ev.phi, ev.log_pi_ref, spec.beta)[0],
                "G": policy_G(th, ev.phi, ev.log_pi_ref, spec.beta),
                "G_ref": policy_G(np.zeros_like(th), ev.phi, ev.log_pi_ref, spec.beta),
            }
        return self._eval[key]


# --------------------------------------------------------------------------- simulation


def _rng(seed: int, cell: Cell, rep: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_crc(cell.name), rep, stream)))


def _cover(theta, cov, theta_star):
    se = np.sqrt(np.clip(np.diagonal(cov, axis1=-2, axis2=-1), 0.0, None))
    return np.mean(np.abs(theta - theta_star) <= Z95 * se, axis=-1)  # NaN cov -> False, masked later


def simulate_chunk(seed: int, cell: Cell, lo: int, hi: int, theta_star, ev: dict | None) -> dict:
    """Replications ``lo .. hi-1`` of ``cell``: per-replication arrays keyed ``<stat>:<method>``."""
    bandit = Bandit(cell.spec)
    scen = make_scenario(cell.scenario, bandit)
    reps = range(lo, hi)
    data = PairData.stack([sample_pairs(_rng(seed, cell, r, 0), bandit, scen, cell.n, cell.M, cell.aux_prompts)
                           for r in reps])
    X, Z, n = data.X, data.Z, cell.n
    fits = {"mle": vrpo.fit_bt(X, Z, lam=0, warn=False)}
    g = ga = Xa = None
    if cell.needs_g:
        g, ga = make_aux(cell.g, scen)(data, [_rng(seed, cell, r, 1) for r in reps])
        Xa = data.X_aux
        for lam in cell.lams:
            if lam > 0:
                fits[f"vr:{lam:g}"] = vrpo.fit_bt(X, Z, g, Xa, ga, lam=lam, warn=False)
        if cell.auto:
            fits["vr-auto"] = vrpo.fit_bt(X, Z, g, Xa, ga, lam="auto", warn=False)
    out = {}
    for m, f in fits.items():
        out[f"theta:{m}"] = f.theta
        out[f"conv:{m}"] = f.converged
        out[f"sand:{m}"] = n * np.trace(f.cov, axis1=-2, axis2=-1)
        out[f"cover:{m}"] = _cover(f.theta, f.cov, theta_star)
        if m == "vr-auto":
            out["lam:vr-auto"] = f.lam
        if cell.needs_regret:
            lp = log_policy_linear(f.theta, ev["phi"], ev["log_pi_ref"], cell.spec.beta)  # (r, E, K)
            out[f"regret:{m}"] = n * regret(lp, ev["log_pi_star"][None], cell.spec.beta)
        if m != "mle" and cell.aux_prompts == "same" and {"labelled-hessian", "unclustered"} & set(cell.mutants):
            with np.errstate(invalid="ignore"):
                C_lab = cov_labelled_hessian(f, X)
                C_unc = cov_unclustered(f, X, Z, g, Xa, ga)
            out[f"sand_lab:{m}"] = n * np.trace(C_lab, axis1=-2, axis2=-1)
            out[f"cover_lab:{m}"] = _cover(f.theta, C_lab, theta_star)
            out[f"sand_unc:{m}"] = n * np.trace(C_unc, axis1=-2, axis2=-1)
            out[f"cover_unc:{m}"] = _cover(f.theta, C_unc, theta_star)
    return out


def _chunk_size(cell: Cell) -> int:
    rows = cell.n * (1 + cell.M)
    return int(max(20, min(500, 300_000 // rows)))


def _cell_key(seed: int, cell: Cell, n_ctx: int, n_batches: int) -> str:
    ident = {"seed": seed, "cell": cell.identity(), "n_ctx": n_ctx, "n_batches": n_batches,
             "version": VALIDATE_VERSION, "vrpo": vrpo.__version__}
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def simulate(plan: Plan, theories: _Theories, *, n_jobs: int = 1, cache_dir=None, progress: bool = True,
             fresh: bool = False) -> dict:
    """Every cell of ``plan``: ``{cell name: {stat: (reps, ...) array}}``; per-cell results are
    cached as ``.npz`` in ``cache_dir`` (resumable) unless ``fresh``."""
    from tqdm.auto import tqdm

    cache = None if cache_dir is None else Path(cache_dir)
    results, todo = {}, []
    for c in plan.cells:
        f = None if cache is None else cache / f"cell-{_cell_key(plan.seed, c, plan.n_ctx, plan.n_batches)}.npz"
        if f is not None and f.exists() and not fresh:
            with np.load(f) as z:
                results[c.name] = {k: z[k] for k in z.files}
        else:
            todo.append((c, f))
    tasks = []
    for c, _ in todo:
        th = theories.theta_star(c.spec, c.scenario)
        ev = theories.eval_set(c.spec, c.scenario) if c.needs_regret else None
        cs = _chunk_size(c)
        tasks += [(c, lo, min(lo + cs, c.reps), th, ev) for lo in range(0, c.reps, cs)]
    parts = {c.name: [] for c, _ in todo}
    n_chunks = {c.name: sum(1 for t in tasks if t[0].name == c.name) for c, _ in todo}
    files = dict((c.name, f) for c, f in todo)
    bar = tqdm(total=len(tasks), desc=f"vrpo validate ({plan.mode})", unit="chunk", disable=not progress)
    if n_jobs == 1:
        gen = (simulate_chunk(plan.seed, *t) for t in tasks)
    else:
        import joblib

        gen = joblib.Parallel(n_jobs=n_jobs, return_as="generator")(
            joblib.delayed(simulate_chunk)(plan.seed, *t) for t in tasks)
    for t, out in zip(tasks, gen):
        c = t[0]
        parts[c.name].append(out)
        bar.update(1)
        if len(parts[c.name]) == n_chunks[c.name]:
            chunks = parts.pop(c.name)
            res = {k: np.concatenate([p[k] for p in chunks]) for k in out}
            results[c.name] = res
            if files[c.name] is not None:
                from vrpo_common.fileio import atomic_path

                with atomic_path(files[c.name], suffix=".npz") as tmp:
                    np.savez(tmp, **res)
    bar.close()
    simulate.last_cached = len(plan.cells) - len(todo)  # cells read from the cache in this call
    return results


# --------------------------------------------------------------------------- checks


def _row(family, statistic, cell_or_cells, method, sim, sim_se, pred, pred_se, *, mutant=None, reps=None,
         nonconverged=0, extra=None) -> dict:
    cells = cell_or_cells if isinstance(cell_or_cells, (list, tuple)) else [cell_or_cells]
    c0 = cells[0]
    z = z_score(sim, sim_se, pred, pred_se)
    row = {
        "family": family, "mutant": mutant, "statistic": statistic, "scenario": c0.scenario, "g": c0.g,
        "M": c0.M, "prompts": c0.aux_prompts, "d": c0.spec.d, "scale": c0.spec.scale, "instance": c0.spec.seed,
        "n": [c.n for c in cells] if len(cells) > 1 else c0.n, "method": method,
        "reps": int(reps if reps is not None else c0.reps), "nonconverged": int(nonconverged),
        "sim": float(sim), "sim_se": float(sim_se), "pred": float(pred), "pred_se": float(pred_se),
        "effect": float(sim - pred), "z": z, "p": p_two_sided(z) if np.isfinite(z) else np.nan,
        "cells": [c.name for c in cells],
    }
    if extra:
        row.update(extra)
    return row


def _lam_of(method, th) -> float:
    if method == "mle":
        return 0.0
    if method == "vr-auto":
        return th.lam("vr-auto")
    return float(method.split(":")[1])


def _ok(res, *methods):
    m = np.ones(len(res[f"conv:{methods[0]}"]), dtype=bool)
    for k in methods:
        m &= res[f"conv:{k}"].astype(bool)
    return m


def _jk(th, fn) -> float:
    return th.jackknife_se(lambda P, G: fn(P))


def _over_n(cells, values):
    """``(sim, se, extra)`` from per-cell ``(value, se)``: the value itself for one cell, else the
    ``n -> infinity`` intercept of ``a + b/n`` (:func:`vrpo_common.stats.extrapolate_inv_n`)."""
    ns = [c.n for c in cells]
    per_n = [[int(n), float(v), float(e)] for n, (v, e) in zip(ns, values)]
    if len(cells) == 1:
        return values[0][0], values[0][1], {"per_n": per_n, "extrapolated": False}
    fit = extrapolate_inv_n(ns, [v for v, _ in values], [e for _, e in values])
    return fit["a"], fit["a_se"], {"per_n": per_n, "slope": fit["b"], "slope_se": fit["b_se"], "extrapolated": True}


def _ratio_checks(cells, sims, th, ev) -> list:
    """VR/MLE variance and regret ratios of one design, at its single ``n`` or extrapolated over its
    ``n`` ladder (under BT the VR-MLE difference is itself O(1/n), so precise cells resolve it)."""
    cells = sorted(cells, key=lambda c: c.n)
    cell = cells[0]
    rows = []
    V = lambda P, lam: P.V(np.full(P.A.shape[:-2], lam))  # noqa: E731
    for m in cell.methods[1:]:
        lam = _lam_of(m, th)
        var, reg, nc, reps = [], [], 0, 0
        for c in cells:
            res = sims[c.name]
            ok = _ok(res, m, "mle")
            nc += int((~ok).sum())
            reps += int(ok.sum())
            var.append(paired_ratio(sq_dev(res[f"theta:{m}"][ok]), sq_dev(res["theta:mle"][ok])))
            if cell.needs_regret:
                reg.append(paired_ratio(res[f"regret:{m}"][ok], res["regret:mle"][ok]))
        sim, se, extra = _over_n(cells, var)
        preds = [("theory", None, th)]
        if m == "vr:1":
            preds += [("mutant", mu, theory_mutant(th, mu)) for mu in ("no-1/M", "wrong-prompts") if mu in cell.mutants]
        for fam, mut, t in preds:
            lam_t = lam if m != "vr-auto" else t.lam("vr-auto")
            pred = t.trV(lam_t) / t.trV(0.0)
            pse = t.ratio_se(m, "trV")
            rows.append(_row(fam, "variance ratio VR/MLE", cells, m, sim, se, pred, pse, mutant=mut, reps=reps,
                             nonconverged=nc, extra=dict(extra, lam=lam_t)))
        if cell.needs_regret:
            G = ev["G"]
            sim, se, extra = _over_n(cells, reg)
            f = lambda P, l_=lam: (np.trace(G @ V(P, l_), axis1=-2, axis2=-1)  # noqa: E731
                                   / np.trace(G @ V(P, 0.0), axis1=-2, axis2=-1))
            rows.append(_row("theory", "regret ratio VR/MLE", cells, m, sim, se, float(f(th.parts)), _jk(th, f),
                             reps=reps, nonconverged=nc, extra=dict(extra, lam=lam)))
    return rows


def _coverage_checks(cell, res) -> list:
    rows = []
    for m in cell.methods:
        ok = res[f"conv:{m}"].astype(bool)
        v, se = mean_se(res[f"cover:{m}"][ok])
        rows.append(_row("theory", "95% Wald coverage", cell, m, v, se, NOMINAL, 0.0, reps=ok.sum(),
                         nonconverged=int((~ok).sum())))
        if "unclustered" in cell.mutants and m == "vr:1":
            v, se = mean_se(res[f"cover_unc:{m}"][ok])
            rows.append(_row("mutant", "95% Wald coverage", cell, m, v, se, NOMINAL, 0.0, mutant="unclustered",
                             reps=ok.sum(), nonconverged=int((~ok).sum())))
    return rows


def _sandwich_checks(cell, res) -> list:
    """Mean sandwich over the simulated variance, VR fits (where the choice of bread matters).

    The MLE's row is reported as ``info``, outside the Holm family: its HC0 sandwich has a
    known downward small-sample bias of order ``d / n`` that the asymptotic theory does
    not address (the labelled-pair score ``(g - Z) X`` of VR at ``lam = 1`` does not depend
    on ``theta``, so its meat is not shrunk that way).
    """
    rows = []
    for m in cell.methods:
        ok = res[f"conv:{m}"].astype(bool)
        D = cell.n * sq_dev(res[f"theta:{m}"][ok])
        v, se = paired_ratio(res[f"sand:{m}"][ok], D)
        rows.append(_row("theory" if m != "mle" else "info", "mean sandwich / simulated n tr Cov", cell, m, v, se,
                         1.0, 0.0, reps=ok.sum(), nonconverged=int((~ok).sum())))
        if m != "mle" and "labelled-hessian" in cell.mutants:
            v, se = paired_ratio(res[f"sand_lab:{m}"][ok], D)
            rows.append(_row("mutant", "mean sandwich / simulated n tr Cov", cell, m, v, se, 1.0, 0.0,
                             mutant="labelled-hessian", reps=ok.sum(), nonconverged=int((~ok).sum())))
    return rows


def lam_argmin(thetas) -> tuple[float, float]:
    """The variance-minimising ``lam`` from fits at ``lam = 0, 1/2, 1`` on common data, and its SE.

    ``thetas``: three ``(R, d)`` arrays. ``tr Cov(theta_hat(lam))`` is a quadratic in ``lam``
    to first order (docs/method.md s3); through its values ``T0, Th, T1`` at the grid,
    ``q2 = 2 T1 - 4 Th + 2 T0``, ``q1 = 4 Th - 3 T0 - T1`` and ``lam = -q1 / (2 q2)``;
    delta-method SE over the paired per-replication squared deviations.
    """
    D = np.stack([sq_dev(t) for t in thetas], axis=1)  # (R, 3)

    def f(T):
        T0, Th, T1 = T
        return -(4 * Th - 3 * T0 - T1) / (2 * (2 * T1 - 4 * Th + 2 * T0))

    return delta_se(f, D)


def _lam_checks(cells, sims, th) -> list:
    """The variance-minimising lam of one design (at its n, or extrapolated over its n ladder) against
    the clustered PPI++ lam* and, as mutant ``naive-lam``, the unclustered one."""
    cells = sorted(cells, key=lambda c: c.n)
    cell = cells[0]
    ms = ["mle", "vr:0.5", "vr:1"]
    vals, nc, reps = [], 0, 0
    for c in cells:
        res = sims[c.name]
        ok = _ok(res, *ms)
        nc += int((~ok).sum())
        reps += int(ok.sum())
        vals.append(lam_argmin([res[f"theta:{m}"][ok] for m in ms]))
    sim, se, extra = _over_n(cells, vals)
    rows = [_row("theory", "variance-minimising lam", cells, "vr:lam", sim, se, th.lam_opt(clip=None),
                 _jk(th, lambda P: P.lam_opt(clip=None)), reps=reps, nonconverged=nc, extra=extra)]
    if "naive-lam" not in cell.mutants:
        return rows
    thn = th.variant(aux_prompts="fresh")
    rows.append(_row("mutant", "variance-minimising lam", cells, "vr:lam", sim, se, naive_lam(th),
                     _jk(thn, lambda P: P.lam_opt(clip=None)), mutant="naive-lam", reps=reps, nonconverged=nc,
                     extra=extra))
    return rows


def _level_checks(cells, sims, th, ev) -> list:
    """n tr Cov vs tr V and n E[regret] vs tr(G V)/(2 beta) over an ``n`` ladder (1/n extrapolation)."""
    cells = sorted(cells, key=lambda c: c.n)
    rows = []
    beta = cells[0].spec.beta
    for m in cells[0].methods:
        lam = _lam_of(m, th)
        for stat in ("n tr Cov", "n E[regret]"):
            ys, ses, nc, reps = [], [], 0, 0
            for c in cells:
                res = sims[c.name]
                ok = res[f"conv:{m}"].astype(bool)
                nc += int((~ok).sum())
                reps += int(ok.sum())
                if stat == "n tr Cov":
                    t, tse = trace_cov_se(res[f"theta:{m}"][ok])
                    ys.append(c.n * t)
                    ses.append(c.n * tse)
                else:
                    v, vse = mean_se(res[f"regret:{m}"][ok])
                    ys.append(v)
                    ses.append(vse)
            ns = [c.n for c in cells]
            if len(cells) > 1:
                fit = extrapolate_inv_n(ns, ys, ses)
                sim, se = fit["a"], fit["a_se"]
                extra = {"per_n": [[int(a), float(b), float(s)] for a, b, s in zip(ns, ys, ses)], "slope": fit["b"],
                         "slope_se": fit["b_se"], "extrapolated": True}
            else:
                sim, se = ys[0], ses[0]
                extra = {"per_n": [[int(ns[0]), float(ys[0]), float(ses[0])]], "extrapolated": False}
            extra["lam"] = lam
            if stat == "n tr Cov":
                pred = th.trV(lam)
                pse = _jk(th, lambda P, l_=lam: np.trace(P.V(np.full(P.A.shape[:-2], l_)), axis1=-2, axis2=-1))
                rows.append(_row("theory", stat, cells, m, sim, se, pred, pse, reps=reps, nonconverged=nc,
                                 extra=extra))
                if m == "mle" and "model-based" in cells[0].mutants:
                    rows.append(_row("mutant", stat, cells, m, sim, se, model_based_trV(th),
                                     _jk(th, lambda P: np.trace(P.A, axis1=-2, axis2=-1)), mutant="model-based",
                                     reps=reps, nonconverged=nc, extra=extra))
            else:
                for fam, mut, G in (("theory", None, ev["G"]), ("mutant", "G-ref", ev["G_ref"])):
                    f = lambda P, l_=lam, G_=G: np.trace(G_ @ P.V(np.full(P.A.shape[:-2], l_)),  # noqa: E731
                                                         axis1=-2, axis2=-1) / (2 * beta)
                    if fam == "mutant" and (m != "mle" or "G-ref" not in cells[0].mutants):
                        continue
                    rows.append(_row(fam, stat, cells, m, sim, se, float(f(th.parts)), _jk(th, f), mutant=mut,
                                     reps=reps, nonconverged=nc, extra=extra))
    return rows


# --------------------------------------------------------------------------- identity check: self g


def self_g_identity(reps: int = 20, n: int = 300, seed: int = 0) -> dict:
    """VR with the ``self`` g (the MLE's own ``sigma(delta)``) equals the MLE, checked from a start
    that is *not* the MLE: ``L_VR`` (``vrpo.vr_objective``) is minimised by an independent
    solver (scipy ``trust-exact`` with the analytic gradient and Hessian) from ``theta = 0``.
    A negative control perturbs ``g`` (logit + 0.3 N(0,1)) and must move the minimiser.

    Returns ``{max_diff, control_diff, tol, n, reps, scenario}``.
    """
    from scipy.optimize import minimize
    from scipy.special import expit, logit

    spec = _spec(seed + 11)
    bandit = Bandit(spec)
    scen = make_scenario("mixture:1.0", bandit)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_crc("self-g identity"),)))
    data = PairData.stack([sample_pairs(rng, bandit, scen, n, 4) for _ in range(reps)])
    g, ga = make_aux("self", scen)(data, [None] * reps)
    mle = vrpo.fit_bt(data.X, data.Z, lam=0).theta
    noise = rng.standard_normal(g.shape), rng.standard_normal(ga.shape)
    gc = expit(logit(np.clip(g, 1e-12, 1 - 1e-12)) + 0.3 * noise[0])
    gac = expit(logit(np.clip(ga, 1e-12, 1 - 1e-12)) + 0.3 * noise[1])

    def solve(X, Z, g_, Xa, ga_):
        Xa2 = Xa.reshape(-1, X.shape[-1])
        ga2 = ga_.reshape(-1)
        N = Xa2.shape[0]

        def f(th):
            return float(vrpo.vr_objective(X @ th, Z, g_, Xa2 @ th, ga2, lam=1.0))

        def grad(th):
            s, sa = expit(X @ th), expit(Xa2 @ th)
            return ((s - Z) - (s - g_)) @ X / len(Z) + (sa - ga2) @ Xa2 / N

        def hess(th):
            sa = expit(Xa2 @ th)
            return (Xa2 * (sa * (1 - sa))[:, None]).T @ Xa2 / N

        r = minimize(f, np.zeros(X.shape[-1]), jac=grad, hess=hess, method="trust-exact", options={"gtol": 1e-12})
        return r.x

    diffs, ctrl = [], []
    for r in range(reps):
        X, Z, Xa = data.X[r], data.Z[r], data.X_aux[r]
        diffs.append(np.max(np.abs(solve(X, Z, g[r], Xa, ga[r]) - mle[r])))
        ctrl.append(np.max(np.abs(solve(X, Z, gc[r], Xa, gac[r]) - mle[r])))
    return {"max_diff": float(np.max(diffs)), "control_diff": float(np.min(ctrl)), "tol": 1e-7, "n": n,
            "reps": reps, "scenario": "mixture:1.0", "start": "theta = 0"}


# --------------------------------------------------------------------------- decisions and diagnoses


def _decide(rows: list) -> dict:
    th = [r for r in rows if r["family"] == "theory"]
    mu = [r for r in rows if r["family"] == "mutant"]
    for fam, alpha in ((th, ALPHA_FW), (mu, ALPHA_KILL)):
        adj = holm([r["p"] for r in fam])
        for r, a in zip(fam, adj):
            r["p_holm"] = float(a)
            r["rejected"] = bool(np.isfinite(a) and a <= alpha)
            r["flag"] = bool(np.isfinite(r["z"]) and abs(r["z"]) > Z_FLAG)
    for r in th:
        r["verdict"] = "REJECTED" if r["rejected"] else "pass"
    for r in rows:
        if r["family"] == "info":
            r.update(p_holm=np.nan, rejected=False, flag=bool(np.isfinite(r["z"]) and abs(r["z"]) > Z_FLAG),
                     verdict="info")
    killed = {}
    for r in mu:
        killed[r["mutant"]] = killed.get(r["mutant"], False) or r["rejected"]
        r["verdict"] = "kills" if r["rejected"] else "misses"
    N = len(th)
    return {
        "theory_checks": N,
        "theory_rejected": int(sum(r["rejected"] for r in th)),
        "theory_flagged": int(sum(r["flag"] for r in th)),
        "expected_flagged": N * float(p_two_sided(Z_FLAG)),
        "holm_alpha": ALPHA_FW,
        "holm_z_first": holm_threshold(N, ALPHA_FW),
        "mutant_checks": len(mu),
        "kill_alpha": ALPHA_KILL,
        "mutants": {m: {"killed": bool(k), "what": MUTANTS[m].what, "kind": MUTANTS[m].kind,
                        "max_abs_z": float(max(abs(r["z"]) for r in mu if r["mutant"] == m)),
                        "min_abs_z": float(min(abs(r["z"]) for r in mu if r["mutant"] == m)),
                        "checks": int(sum(r["mutant"] == m for r in mu))}
                    for m, k in killed.items()},
        "mutants_missing": sorted(set(MUTANTS) - set(killed)),
    }


def _diagnose(r: dict, rows: list, sims: dict, cells: dict, theories: _Theories) -> str:
    """A diagnosis of one flagged correct check, from the cell's numbers (module docstring)."""
    out = []
    cell = cells[r["cells"][0]]
    res = sims[cell.name]
    if r["nonconverged"]:
        out.append(f"{r['nonconverged']} non-converged fit(s) excluded")
    m = r["method"]
    if r["statistic"] in ("variance ratio VR/MLE", "regret ratio VR/MLE"):
        th = theories.get(cell.spec, cell.scenario, cell.g, cell.M, cell.aux_prompts)
        ok = _ok(res, m, "mle")
        zs = []
        for mm in (m, "mle"):
            t, tse = trace_cov_se(res[f"theta:{mm}"][ok])
            lam = _lam_of(mm, th)
            zs.append(z_score(cell.n * t, cell.n * tse, th.trV(lam)))
        moved = [nm for nm, z in zip(("numerator (VR)", "denominator (MLE)"), zs) if abs(z) > 2]
        out.append(f"n tr Cov vs tr V: numerator z = {zs[0]:+.1f}, denominator z = {zs[1]:+.1f}"
                   + (f"; the {' and the '.join(moved)} moved" if moved else "; neither level alone is beyond 2 SE"))
    if r["statistic"] == "n E[regret]":
        th = theories.get(cell.spec, cell.scenario, cell.g, cell.M, cell.aux_prompts)
        G = theories.eval_set(cell.spec, cell.scenario)["G"]
        n_max = max(c.n for c in (cells[nm] for nm in r["cells"]))
        extra = n_max * float(np.sum(np.diag(G) * th.theta_star_se**2)) / (2 * cell.spec.beta)
        out.append(f"theta*'s own Monte Carlo error (SE up to {np.max(th.theta_star_se):.1e}) adds about "
                   f"{100 * extra / r['pred']:.1f}% at n = {n_max}")
    if r.get("extrapolated") and r["statistic"] in ("variance ratio VR/MLE", "regret ratio VR/MLE",
                                                    "variance-minimising lam"):
        out.append("by n: " + ", ".join(f"n = {a}: {b:.4f} ± {e:.4f}" for a, b, e in r["per_n"])
                   + f"; fitted slope b = {r['slope']:.2f} ± {r['slope_se']:.2f}")
    if r["statistic"] in ("n tr Cov", "n E[regret]") and r.get("per_n"):
        per = r["per_n"]
        pred = r["pred"]
        out.append("excess over the limit by n: " + ", ".join(f"n = {a}: {100 * (b / pred - 1):+.1f}%" for a, b, _ in per)
                   + (f"; fitted slope b = {r['slope']:.1f} ± {r['slope_se']:.1f} (excess b/n)" if r.get("extrapolated")
                      else ""))
    if r["statistic"] == "95% Wald coverage":
        ok = res[f"conv:{m}"].astype(bool)
        cal, cal_se = paired_ratio(res[f"sand:{m}"][ok], cell.n * sq_dev(res[f"theta:{m}"][ok]))
        out.append(f"mean sandwich / simulated n tr Cov = {cal:.3f} ± {cal_se:.3f} (z = {z_score(cal, cal_se, 1.0):+.1f})")
    same = [q for q in rows if q is not r and q["family"] == "theory" and q["statistic"] == r["statistic"]
            and q["scenario"] == r["scenario"] and q["method"] == r["method"] and q["g"] == r["g"]
            and q["prompts"] == r["prompts"] and q["M"] == r["M"] and q["instance"] != r["instance"]]
    if same:
        out.append("the same check on the other instance(s): z = " + ", ".join(f"{q['z']:+.1f}" for q in same))
    return "; ".join(out) if out else "no other statistic of this cell deviates"


# --------------------------------------------------------------------------- driver


def run_validation(mode: str = "quick", *, seed: int = 0, n_jobs: int = 1, cache_dir="results/validate/cache",
                   progress: bool = True, fresh: bool = False, reps_scale: float = 1.0, plan: Plan | None = None,
                   n_ctx: int | None = None) -> dict:
    """Run the validation; returns the JSON-able result (config, rows, summary, identity, timings).

    ``plan`` replaces the mode's cells (tests); ``n_ctx`` the theory's context count.
    """
    t0 = time.time()
    plan = make_plan(mode, seed, reps_scale) if plan is None else plan
    if n_ctx is not None:
        plan = replace(plan, n_ctx=n_ctx, n_batches=min(plan.n_batches, max(2, n_ctx // 500)))
    mode = plan.mode
    theories = _Theories(plan, None if cache_dir is None else Path(cache_dir) / "theory")
    # theory first (main process; cached), then the cells
    for c in plan.cells:
        theories.get(c.spec, c.scenario, c.g, c.M, c.aux_prompts)
        if c.needs_regret:
            theories.eval_set(c.spec, c.scenario)
    t_theory = time.time() - t0
    sims = simulate(plan, theories, n_jobs=n_jobs, cache_dir=cache_dir, progress=progress, fresh=fresh)
    t_sim = time.time() - t0 - t_theory
    cells = {c.name: c for c in plan.cells}
    rows = []
    ladders: dict = {}
    ratio_ladders: dict = {}
    lam_ladders: dict = {}
    for c in plan.cells:
        th = theories.get(c.spec, c.scenario, c.g, c.M, c.aux_prompts)
        res = sims[c.name]
        if "ratio" in c.checks:
            ratio_ladders.setdefault(c.design, []).append(c)
        if "coverage" in c.checks:
            rows += _coverage_checks(c, res)
        if "sandwich" in c.checks:
            rows += _sandwich_checks(c, res)
        if "lam" in c.checks:
            lam_ladders.setdefault(c.design, []).append(c)
        if "level" in c.checks:
            ladders.setdefault(c.design, []).append(c)
    for design, cs in ratio_ladders.items():
        c0 = cs[0]
        rows += _ratio_checks(cs, sims, theories.get(c0.spec, c0.scenario, c0.g, c0.M, c0.aux_prompts),
                              theories.eval_set(c0.spec, c0.scenario) if c0.needs_regret else None)
    for design, cs in lam_ladders.items():
        c0 = cs[0]
        rows += _lam_checks(cs, sims, theories.get(c0.spec, c0.scenario, c0.g, c0.M, c0.aux_prompts))
    for design, cs in ladders.items():
        c0 = cs[0]
        rows += _level_checks(cs, sims, theories.get(c0.spec, c0.scenario, c0.g, c0.M, c0.aux_prompts),
                              theories.eval_set(c0.spec, c0.scenario))
    summary = _decide(rows)
    for r in rows:
        if r["family"] == "theory" and (r["flag"] or r["rejected"]):
            r["diagnosis"] = _diagnose(r, rows, sims, cells, theories)
    ident = self_g_identity(reps=plan.selfg_reps, seed=seed)
    ident["passed"] = bool(ident["max_diff"] <= ident["tol"] < ident["control_diff"])
    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover
        load = (float("nan"),) * 3
    return {
        "mode": mode, "plan": plan.identity(), "rows": rows, "summary": summary, "self_g": ident,
        "timings": {"theory_s": t_theory, "simulation_s": t_sim, "total_s": time.time() - t0,
                    "cells_from_cache": int(getattr(simulate, "last_cached", 0)), "cells": len(plan.cells)},
        "load_average": list(load), "n_jobs": n_jobs, "vrpo_version": vrpo.__version__,
        "alpha": {"holm_fw": ALPHA_FW, "kill": ALPHA_KILL, "z_flag": Z_FLAG},
    }


def exit_code(result: dict) -> int:
    """1 if a correct check is rejected after Holm, a mutant survives or is untested, or an identity fails."""
    s = result["summary"]
    bad = s["theory_rejected"] > 0 or any(not v["killed"] for v in s["mutants"].values()) or s["mutants_missing"]
    return int(bool(bad) or not result["self_g"]["passed"])


def _label(r) -> str:
    n = r["n"] if not isinstance(r["n"], list) else ("n->inf (" + ",".join(str(v) for v in r["n"]) + ")")
    what = r["statistic"] + ("" if r["family"] == "theory" else f" [{r['mutant']}]")
    return (f"{what} | {r['scenario']} {r['g']} M={r['M']} {r['prompts']} d={r['d']} seed={r['instance']} "
            f"n={n} {r['method']}")


def format_table(result: dict) -> str:
    """The human-readable table: check, simulated ± SE, predicted, effect, SE, z, p (Holm), verdict."""
    lines = []
    hdr = f"{'check':<96} {'sim':>9} {'pred':>9} {'effect':>9} {'SE':>8} {'z':>7} {'p(Holm)':>9}  verdict"
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for r in sorted(result["rows"], key=lambda r: (r["family"] != "theory", r.get("mutant") or "", r["statistic"])):
        se = math.sqrt(r["sim_se"] ** 2 + r["pred_se"] ** 2)
        lines.append(f"{_label(r)[:96]:<96} {r['sim']:>9.4f} {r['pred']:>9.4f} {r['effect']:>+9.4f} {se:>8.4f} "
                     f"{r['z']:>+7.1f} {r['p_holm']:>9.1e}  {r['verdict']}")
    s = result["summary"]
    lines.append("")
    lines.append(f"correct theory: {s['theory_checks']} checks; |z| > {Z_FLAG:g}: {s['theory_flagged']} observed, "
                 f"{s['expected_flagged']:.2f} expected by chance; rejected after Holm at family-wise "
                 f"{s['holm_alpha']:g}: {s['theory_rejected']} (first rejection needs |z| > {s['holm_z_first']:.2f})")
    for m, v in s["mutants"].items():
        lines.append(f"mutant {m:<17} {'KILLED ' if v['killed'] else 'SURVIVES'} largest |z| = {v['max_abs_z']:.1f} "
                     f"over {v['checks']} check(s): {v['what']}")
    for m in s["mutants_missing"]:
        lines.append(f"mutant {m:<17} NOT TESTED in this mode")
    ig = result["self_g"]
    lines.append(f"identity: VR with self g = MLE from {ig['start']}: max |diff| = {ig['max_diff']:.1e} "
                 f"(tol {ig['tol']:g}; perturbed-g control {ig['control_diff']:.1e}) -> "
                 f"{'pass' if ig['passed'] else 'FAIL'}")
    t = result["timings"]
    lines.append(f"time {t['total_s']:.0f} s (theory {t['theory_s']:.0f} s, simulation {t['simulation_s']:.0f} s), "
                 f"load average {result['load_average'][0]:.2f}, n_jobs {result['n_jobs']}")
    return "\n".join(lines)


def strict_json(obj):
    """``obj`` with NaN / infinite floats replaced by ``None`` (strict JSON for ``--json`` consumers)."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_result(result: dict, path) -> Path:
    """The result as strict JSON (NaN -> null), written atomically."""
    return write_json(path, strict_json(result), indent=1, allow_nan=False)


def render_markdown(result: dict) -> str:  # filled in by analysis.validate_report
    from .validate_report import render_validation_section

    return render_validation_section(result)
