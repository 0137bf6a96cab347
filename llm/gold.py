"""The gold preference over text: a known, BT-misspecified ``p*(x, y1, y2)`` built from real annotators.

Two reward heads on frozen text features, fitted on the GPT-3.5-relabeled HH pairs
(``relabeled-hh-rlhf/{helpful,harmless}``, Siththaranjan et al. 2023): head ``A`` on the
*helpful* labels, head ``B`` on the *harmless* labels, two real objectives that
conflict. The gold preference is the hidden-context mixture (the annotator type is
drawn per prompt, independently of the responses)::

    p*(x, y1, y2) = (1 - w(x)) sigma(r_A(y1) - r_A(y2)) + w(x) sigma(r_B(y1) - r_B(y2))
    w(x) = kappa * w_max                     (weight="constant")
    w(x) = kappa * q(x)                      (weight="prompt")

``q(x)`` is a logistic model of "this prompt comes from the red-team (harmless-base)
subset", fitted on the same files, so harmlessness annotators are likelier on red-team
prompts. ``kappa = 0`` is exactly BT in the gold reward ``r_A``; ``kappa = 1`` is the
full mixture. ``p*(x, y1, y2) + p*(x, y2, y1) = 1`` for every ``kappa`` (tested).

Features ``phi(y)`` (``features="minilm-static"``, the default): the mean of the frozen
all-MiniLM-L6-v2 *input* word-piece embeddings of the response (unit norm, 384) plus
``log(1 + chars)`` and ``log(1 + words)``. It is the first layer of the suite's MiniLM
encoder without the transformer: about 200x faster, and its heads predict the GPT-3.5
labels about as well (measured by :func:`feature_adequacy`, numbers in
``docs/llm_regret.md``). ``features="minilm"`` uses the full encoder
(:mod:`llm.features`) for users with a GPU.

Heads are linear, ``r_k(y) = s_k theta_k . phi(y)``: ``theta_k`` is the ridge BT fit
(:func:`vrpo.fit_bt`, ridge chosen by K-fold cross-validated log-loss) and ``s_k`` the
scale that makes the standard deviation of ``r_k(y1) - r_k(y2)`` over pairs sampled from
``pi_ref`` equal ``target_sd`` (:meth:`GoldPreference.scaled_to`), so that gold
preferences between ``pi_ref`` samples are informative.

Everything downstream needs only the per-response head rewards ``(r_A, r_B)`` and the
per-prompt weight ``w(x)``; :func:`p_star` is a pure function of those.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Literal
from pathlib import Path

import numpy as np
from scipy.special import expit

__all__ = [
    "FEATURE_KINDS",
    "WEIGHT_MODES",
    "TextFeatures",
    "HeadFit",
    "GoldPreference",
    "p_star",
    "sample_labels",
    "fit_gold",
    "fit_ridge_bt",
    "feature_adequacy",
    "relabeled_path",
]

FEATURE_KINDS = ("minilm-static", "minilm")
WEIGHT_MODES = ("constant", "prompt")
HEADS = ("helpful", "harmless")  # type A, type B


def relabeled_path(data_dir: str | Path, objective: str) -> Path:
    """``<data_dir>/relabeled-hh-rlhf/<objective>/test.jsonl.gz``."""
    return Path(data_dir) / "relabeled-hh-rlhf" / objective / "test.jsonl.gz"


# --------------------------------------------------------------------------- the preference itself


def p_star(rA1, rB1, rA2, rB2, w):
    """Gold ``P(y1 > y2 | x)`` from head rewards: ``(1-w) sigma(rA1-rA2) + w sigma(rB1-rB2)``.

    All arguments broadcast (rewards of ``y1`` and ``y2`` under heads A and B, and the
    per-prompt weight ``w(x)`` of type B). Antisymmetric by construction:
    ``p_star(a, b) = 1 - p_star(b, a)`` since ``sigma(-t) = 1 - sigma(t)``.
    """
    w = np.asarray(w, dtype=float)
    return (1.0 - w) * expit(np.subtract(rA1, rA2)) + w * expit(np.subtract(rB1, rB2))


def sample_labels(p, u):
    """``Z = 1{u < p}``: Bernoulli(p) labels from uniforms ``u`` (common random numbers across kappa)."""
    p, u = np.asarray(p, float), np.asarray(u, float)
    if p.shape != u.shape:
        raise ValueError(f"p and u differ in shape: {p.shape} vs {u.shape}")
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError("p must be probabilities in [0, 1]")
    return (u < p).astype(float)


# --------------------------------------------------------------------------- features


class TextFeatures:
    """Frozen response features ``phi(y)``: ``(n, D)`` float64 for a list of strings.

    ``minilm-static``: mean MiniLM input embedding of the word pieces (unit norm; zeros for an
    empty text) + ``[log1p(chars), log1p(words)]``; ``D = 386``. ``minilm``: the full
    sentence embedding (:func:`llm.features.embed_texts`, cached on disk) + the same two
    length features. ``length=False`` drops the length features.
    """

    def __init__(self, kind: str = "minilm-static", length: bool = True, cache_dir=None, progress: bool = False):
        if kind not in FEATURE_KINDS:
            raise ValueError(f"features must be one of {FEATURE_KINDS}; got {kind!r}")
        self.kind, self.length, self.cache_dir, self.progress = kind, bool(length), cache_dir, progress
        self._W = None

    @property
    def dim(self) -> int:
        return 384 + (2 if self.length else 0)

    def _static_matrix(self) -> np.ndarray:
        if self._W is None:
            from safetensors.numpy import load_file

            from .features import model_path

            blob = load_file(str(model_path() / "model.safetensors"))
            keys = [k for k in blob if k.endswith("word_embeddings.weight")]
            if len(keys) != 1:
                raise KeyError(f"MiniLM weights: expected one word_embeddings matrix, found {keys}")
            self._W = blob[keys[0]].astype(np.float32)  # (30522, 384)
        return self._W

    def embed(self, texts) -> np.ndarray:
        """The 384-dim part: ``(n, 384)`` float32 (unit rows; zeros for texts without word pieces)."""
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("TextFeatures needs a list of strings")
        if not texts:
            return np.zeros((0, 384), np.float32)
        if self.kind == "minilm":
            from .features import embed_texts

            return embed_texts(texts, cache_dir=self.cache_dir, progress=self.progress)
        from .features import MAX_SEQ_LENGTH, load_tokenizer

        W = self._static_matrix()
        ids = load_tokenizer()(texts, add_special_tokens=False, truncation=True, max_length=MAX_SEQ_LENGTH,
                               verbose=False)["input_ids"]
        import scipy.sparse as sp

        lens = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))  # (n,)
        flat = np.fromiter((t for i in ids for t in i), dtype=np.int64, count=int(lens.sum()))
        indptr = np.concatenate([[0], np.cumsum(lens)])
        counts = sp.csr_matrix((np.ones(len(flat), np.float32), flat, indptr), shape=(len(ids), W.shape[0]))
        out = np.asarray(counts @ W, dtype=np.float64)  # (n, 384) sums of word-piece embeddings
        norm = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.where(norm > 0, norm, 1.0)).astype(np.float32)

    def __call__(self, texts) -> np.ndarray:
        texts = list(texts)
        e = self.embed(texts).astype(np.float64)
        if not self.length:
            return e
        L = np.array([[math.log1p(len(t)), math.log1p(len(t.split()))] for t in texts], dtype=np.float64)
        return np.concatenate([e, L.reshape(len(texts), 2)], axis=1)  # (n, 386)


# --------------------------------------------------------------------------- fitting


def fit_ridge_bt(X: np.ndarray, Z: np.ndarray, ridges=(1e-4, 1e-3, 1e-2, 1e-1), k_folds: int = 5, seed: int = 0):
    """Ridge BT/logistic fit (no intercept) with the ridge chosen by K-fold CV log-loss.

    ``X (n, d)`` margins (or inputs), ``Z (n,)`` labels. Returns
    ``(theta (d,), info)`` with ``info = {ridge, cv_logloss, cv_acc, cv_acc_se, n}``;
    CV accuracy is the share of held-out pairs on the label's side (ties 1/2), its SE binomial.
    """
    from vrpo import ConvergenceWarning, fit_bt, logistic_loss

    X, Z = np.asarray(X, float), np.asarray(Z, float)
    n = len(Z)
    fold = np.random.default_rng(seed).permutation(n) % k_folds
    scores = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for r in ridges:
            ll, acc = np.empty(n), np.empty(n)
            for k in range(k_folds):
                tr, te = fold != k, fold == k
                th = fit_bt(X[tr], Z[tr], lam=0, ridge=r).theta
                m = X[te] @ th
                ll[te] = logistic_loss(m, Z[te])
                acc[te] = np.where(m == 0, 0.5, (m > 0) == (Z[te] > 0.5))
            scores[r] = (float(ll.mean()), float(acc.mean()))
        best = min(scores, key=lambda r: scores[r][0])
        theta = fit_bt(X, Z, lam=0, ridge=best).theta
    acc = scores[best][1]
    return theta, {"ridge": best, "cv_logloss": scores[best][0], "cv_acc": acc,
                   "cv_acc_se": math.sqrt(acc * (1 - acc) / n), "n": n,
                   "cv_by_ridge": {str(r): {"logloss": v[0], "acc": v[1]} for r, v in scores.items()}}


@dataclass
class HeadFit:
    """Unscaled heads and the prompt-weight model, as fitted on the relabeled data."""

    theta: dict  # head name -> (D,) list
    prompt_theta: list  # (385,) weights of q(x) = sigma(theta . [e(x), 1])
    info: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "HeadFit":
        return cls(**json.loads(text))


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def fit_gold(data_dir, features: TextFeatures, cache_dir=None, k_folds: int = 5, seed: int = 0,
             max_pairs: int | None = None, progress: bool = True) -> HeadFit:
    """Fit head A (helpful labels), head B (harmless labels) and the prompt-weight model ``q(x)``.

    Head ``k``: BT on ``phi(response_0) - phi(response_1)`` with ``Z = 1{GPT-3.5 preferred response_0}``
    over all pairs of ``relabeled-hh-rlhf/<objective>``. ``q(x)``: logistic on ``[e(prompt), 1]`` for
    ``data_subset == "harmless"`` over the prompts of both files. Cached (JSON) under
    ``cache_dir`` by the data files' sha256 and the settings.
    """
    from .data import load_relabeled
    from .features import prompt_tail

    paths = {o: relabeled_path(data_dir, o) for o in HEADS}
    for p in paths.values():
        if not p.exists():
            raise FileNotFoundError(f"{p}: relabeled HH data not found; pass --data-dir pointing at the shared data "
                                    "directory (see ../shared/data/README.md)")
    key = hashlib.sha256(json.dumps({"files": {o: _file_sha(p) for o, p in paths.items()}, "features": features.kind,
                                     "length": features.length, "k": k_folds, "seed": seed, "max": max_pairs,
                                     "v": 1}, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"gold-heads-{key}.json" if cache_dir else None
    if cache is not None and cache.exists():
        return HeadFit.from_json(cache.read_text())
    t0 = time.time()
    theta, info, prompts, subset = {}, {"heads": {}}, [], []
    for obj in HEADS:
        df = load_relabeled(paths[obj], on_error="skip")
        if max_pairs:
            df = df.iloc[:max_pairs]
        rep = df.attrs["load_report"]
        X = features(df.response_0.tolist()) - features(df.response_1.tolist())  # (n, D)
        Z = (df.llm_label.to_numpy() == 0).astype(float)
        th, fi = fit_ridge_bt(X, Z, k_folds=k_folds, seed=seed)
        # agreement with the human label (context: GPT-3.5 and humans agree on ~59%)
        m = X @ th
        fi["train_acc_vs_human"] = float(np.mean((m > 0) == (df.human_label.to_numpy() == 0)))
        fi["load_summary"] = rep.summary()
        if features.length:
            fi["length_coef"] = {"log1p_chars": float(th[-2]), "log1p_words": float(th[-1])}
        theta[obj] = th.tolist()
        info["heads"][obj] = fi
        prompts += df.prompt.tolist()
        subset += (df.data_subset == "harmless").tolist()
        if progress:
            print(f"gold head {obj}: {len(df)} pairs, CV accuracy on GPT-3.5 labels {fi['cv_acc']:.3f} "
                  f"(ridge {fi['ridge']:g})", flush=True)
    E = TextFeatures("minilm-static", length=False).embed(prompt_tail(prompts)).astype(float)
    Xp = np.concatenate([E, np.ones((len(E), 1))], axis=1)  # (P, 385)
    pth, pinfo = fit_ridge_bt(Xp, np.asarray(subset, float), k_folds=k_folds, seed=seed)
    pinfo["share_harmless_subset"] = float(np.mean(subset))
    info["prompt_weight"] = pinfo
    info["fit_s"] = time.time() - t0
    info["features"] = {"kind": features.kind, "length": features.length, "dim": features.dim}
    out = HeadFit(theta=theta, prompt_theta=pth.tolist(), info=info)
    if cache is not None:
        from vrpo_common.fileio import write_text

        write_text(cache, out.to_json())
    return out


# --------------------------------------------------------------------------- the scaled gold


@dataclass(frozen=True)
class GoldPreference:
    """The gold preference at strength ``kappa`` (validated; JSON-able via :meth:`to_dict`).

    ``theta_A, theta_B``: scaled head weights (``r_k = theta_k . phi``); ``scale_A, scale_B`` the
    factors applied to the fitted heads; ``w_max`` type-B weight at ``kappa = 1`` (constant mode);
    ``prompt_theta`` the ``q(x)`` model (prompt mode).
    """

    theta_A: tuple
    theta_B: tuple
    kappa: float = 1.0
    weight: Literal["constant", "prompt"] = "constant"
    w_max: float = 0.5
    prompt_theta: tuple = ()
    scale_A: float = 1.0
    scale_B: float = 1.0

    def __post_init__(self):
        if not (0.0 <= float(self.kappa) <= 1.0):
            raise ValueError(f"kappa must be in [0, 1] (0: BT in head A, 1: full mixture); got {self.kappa}")
        if self.weight not in WEIGHT_MODES:
            raise ValueError(f"weight must be one of {WEIGHT_MODES}; got {self.weight!r}")
        if not (0.0 < self.w_max <= 1.0):
            raise ValueError(f"w_max must be in (0, 1]; got {self.w_max}")
        if len(self.theta_A) != len(self.theta_B) or not len(self.theta_A):
            raise ValueError("theta_A and theta_B must be non-empty and of equal length")
        if self.weight == "prompt" and len(self.prompt_theta) != 385:
            raise ValueError("weight='prompt' needs the 385 weights of the prompt model q(x)")

    @classmethod
    def from_fit(cls, fit: HeadFit, kappa: float = 1.0, weight: str = "constant", w_max: float = 0.5):
        return cls(tuple(fit.theta["helpful"]), tuple(fit.theta["harmless"]), kappa, weight, w_max,
                   tuple(fit.prompt_theta))

    def with_kappa(self, kappa: float) -> "GoldPreference":
        d = self.to_dict()
        d["kappa"] = float(kappa)
        return GoldPreference.from_dict(d)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "GoldPreference":
        d = dict(d)
        for k in ("theta_A", "theta_B", "prompt_theta"):
            d[k] = tuple(d.get(k, ()))
        return cls(**d)

    # ---------------------------------------------------------------- evaluation
    def rewards(self, phi: np.ndarray) -> np.ndarray:
        """``(..., D) -> (..., 2)``: ``[r_A(y), r_B(y)]``."""
        phi = np.asarray(phi, float)
        return np.stack([phi @ np.asarray(self.theta_A), phi @ np.asarray(self.theta_B)], axis=-1)

    def prompt_q(self, e_prompt: np.ndarray) -> np.ndarray:
        """``q(x) = P(red-team prompt | x)`` from the 384-dim static prompt embedding ``(..., 384) -> (...)``."""
        e = np.asarray(e_prompt, float)
        th = np.asarray(self.prompt_theta)
        return expit(e @ th[:-1] + th[-1])

    def weight_of(self, q: np.ndarray | None = None, n: int | None = None) -> np.ndarray:
        """Type-B weight ``w(x)``: ``kappa * w_max`` (constant) or ``kappa * q(x)`` (prompt)."""
        if self.weight == "prompt":
            if q is None:
                raise ValueError("weight='prompt' needs q(x) for each prompt")
            return self.kappa * np.asarray(q, float)
        shape = np.shape(q) if q is not None else (n if n is not None else ())
        return np.full(shape, self.kappa * self.w_max)

    def p(self, R1: np.ndarray, R2: np.ndarray, w) -> np.ndarray:
        """``p*(x, y1, y2)`` from head rewards ``R1, R2 (..., 2)`` and weights ``w`` (broadcast to ``(...)``)."""
        R1, R2 = np.asarray(R1, float), np.asarray(R2, float)
        return p_star(R1[..., 0], R1[..., 1], R2[..., 0], R2[..., 1], w)

    def bt_reward(self) -> np.ndarray | None:
        """The BT reward when ``kappa = 0`` (``theta_A``), else ``None`` (a mixture of two BT models is not BT)."""
        return np.asarray(self.theta_A) if self.kappa == 0 else None

    def scaled_to(self, R_pairs1: np.ndarray, R_pairs2: np.ndarray, target_sd: float) -> "GoldPreference":
        """Rescale both heads so ``sd(r_k(y1) - r_k(y2)) = target_sd`` over the given ``pi_ref`` pairs.

        ``R_pairs1, R_pairs2 (P, 2)``: *this* gold's head rewards of the two responses of each pair.
        """
        if target_sd <= 0:
            raise ValueError(f"target_sd must be > 0; got {target_sd}")
        D = np.asarray(R_pairs1, float) - np.asarray(R_pairs2, float)  # (P, 2)
        sd = D.std(axis=0)
        if np.any(~np.isfinite(sd)) or np.any(sd <= 0):
            raise ValueError(f"cannot scale the heads: reward differences on pi_ref pairs have sd {sd.tolist()} "
                             "(identical responses?)")
        s = target_sd / sd
        d = self.to_dict()
        d["theta_A"] = list(np.asarray(self.theta_A) * s[0])
        d["theta_B"] = list(np.asarray(self.theta_B) * s[1])
        d["scale_A"], d["scale_B"] = float(self.scale_A * s[0]), float(self.scale_B * s[1])
        return GoldPreference.from_dict(d)


def pstar_summary(p: np.ndarray) -> dict:
    """Distribution of ``p*`` over pairs: quantiles, mean ``|p* - 1/2|``, mean ``p*(1-p*)`` and share near 1/2."""
    p = np.asarray(p, float).ravel()
    q = np.quantile(p, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"n_pairs": int(p.size), "q05": q[0], "q25": q[1], "median": q[2], "q75": q[3], "q95": q[4],
            "mean_abs_dev": float(np.mean(np.abs(p - 0.5))), "mean_var": float(np.mean(p * (1 - p))),
            "share_within_0.1_of_half": float(np.mean(np.abs(p - 0.5) < 0.1)),
            "share_beyond_0.4": float(np.mean(np.abs(p - 0.5) > 0.4)),
            "hist": np.histogram(p, bins=10, range=(0, 1))[0].tolist()}


__all__.append("pstar_summary")


# --------------------------------------------------------------------------- adequacy of the fast features


def feature_adequacy(data_dir, max_pairs: int = 1000, k_folds: int = 5, seed: int = 0, cache_dir=None,
                     progress: bool = True) -> dict:
    """CV accuracy on the GPT-3.5 labels of heads on ``minilm-static`` vs full ``minilm`` features, and their cost.

    The same (seeded) ``max_pairs`` pairs per objective, the same folds and ridge grid. Returns
    ``{objective: {kind: {cv_acc, cv_acc_se, s_per_1000_texts}}}``. The full encoder is slow on CPU
    (minutes for 1000 pairs); this is a one-off measurement, not part of a run.
    """
    from .data import load_relabeled

    out = {}
    for obj in HEADS:
        df = load_relabeled(relabeled_path(data_dir, obj), on_error="skip")
        idx = np.sort(np.random.default_rng(seed).permutation(len(df))[:max_pairs])
        df = df.iloc[idx]
        texts = df.response_0.tolist() + df.response_1.tolist()
        Z = (df.llm_label.to_numpy() == 0).astype(float)
        res = {}
        for kind in FEATURE_KINDS:
            f = TextFeatures(kind, cache_dir=cache_dir, progress=progress)
            t = time.time()
            F = f(texts)
            dt = time.time() - t
            n = len(df)
            _, info = fit_ridge_bt(F[:n] - F[n:], Z, k_folds=k_folds, seed=seed)
            res[kind] = {"cv_acc": info["cv_acc"], "cv_acc_se": info["cv_acc_se"], "ridge": info["ridge"],
                         "s_per_1000_texts": 1000 * dt / len(texts)}
            if progress:
                print(f"{obj} / {kind}: CV accuracy {info['cv_acc']:.3f} ± {info['cv_acc_se']:.3f}, "
                      f"{res[kind]['s_per_1000_texts']:.2f} s per 1000 texts", flush=True)
        out[obj] = res
    return out
