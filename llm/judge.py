"""Linear Bradley-Terry preference models on text features: the demo's ``g`` and its judge.

:class:`LinearPreferenceModel` fits ``r(x, y) = w . phi(x, y)`` by logistic regression on
``phi(x, y1) - phi(x, y2)`` (both orders, no intercept, so ``P(a > b) = 1 - P(b > a)``), the L2
strength chosen by cross-validation. Features: :class:`MiniLMFeatures` (the judge; frozen MiniLM
embeddings ``[e(y), e(x) * e(y)]``), :class:`TfidfFeatures` (``g``; response TF-IDF, another
feature family). A fitted model is callable as ``model(prompts, a, b) -> P(a > b)``, the
``g_model`` of :class:`llm.vrpo_trainer.VRPOTrainer`.
"""

from __future__ import annotations

import inspect

from typing import Sequence

import numpy as np

from vrpo.loss import sigmoid

__all__ = ["MiniLMFeatures", "TfidfFeatures", "LinearPreferenceModel"]


class MiniLMFeatures:
    """``phi(x, y) = [e(y), e(x) * e(y)]`` from frozen MiniLM embeddings (cached on disk)."""

    name = "MiniLM-L6 [e(y), e(x)*e(y)]"

    def __init__(self, cache_dir=None, progress: bool = False):
        self.cache_dir, self.progress = cache_dir, progress

    def fit(self, prompts, responses):
        return self

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        from .features import embed_texts, prompt_tail, reward_features

        e_x = embed_texts(prompt_tail(list(prompts)), cache_dir=self.cache_dir, progress=self.progress,
                          desc="embed prompts")
        e_y = embed_texts([r if r.strip() else "(empty)" for r in responses], cache_dir=self.cache_dir,
                          progress=self.progress, desc="embed responses")
        return reward_features(e_x, e_y)  # (n, 768)


class TfidfFeatures:
    """Word 1-2-gram TF-IDF of the response (vocabulary fitted on the training responses)."""

    name = "TF-IDF 1-2-grams of the response"

    def __init__(self, max_features: int = 20000):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=max_features, sublinear_tf=True)

    def fit(self, prompts, responses):
        self.vec.fit(list(responses))
        return self

    def __call__(self, prompts, responses):
        return self.vec.transform(list(responses))


class LinearPreferenceModel:
    """BT reward ``r = w . phi`` fitted on (prompt, chosen, rejected) pairs."""

    def __init__(self, features, Cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0), seed: int = 0):
        self.features, self.Cs, self.seed = features, tuple(Cs), seed
        self.w = self.C = self.cv_accuracy = None

    def fit(self, prompts, chosen, rejected) -> "LinearPreferenceModel":
        from scipy import sparse
        from sklearn.linear_model import LogisticRegressionCV

        prompts, chosen, rejected = list(prompts), list(chosen), list(rejected)
        self.features.fit(prompts + prompts, chosen + rejected)
        diff = self.features(prompts, chosen) - self.features(prompts, rejected)  # (n, d)
        X = sparse.vstack([diff, -diff]) if sparse.issparse(diff) else np.vstack([diff, -diff])
        y = np.r_[np.ones(len(prompts)), np.zeros(len(prompts))]
        folds = np.random.default_rng(self.seed).permutation(np.arange(len(prompts)) % 5)  # both orders: one fold
        cv = [(np.where(np.r_[folds, folds] != k)[0], np.where(np.r_[folds, folds] == k)[0]) for k in range(5)]
        # scikit-learn >= 1.8 announces new defaults for 1.10 (l1_ratios, simplified fitted attributes): ask for
        # the new behaviour explicitly where it exists (same fit: pure L2, l1_ratio 0), the legacy one before
        new_api = "use_legacy_attributes" in inspect.signature(LogisticRegressionCV).parameters
        kw = dict(l1_ratios=(0.0,), use_legacy_attributes=False) if new_api else {}
        clf = LogisticRegressionCV(Cs=list(self.Cs), cv=cv, fit_intercept=False, max_iter=2000, scoring="accuracy",
                                   **kw)
        clf.fit(X, y)
        self.w = clf.coef_.ravel()
        if new_api:  # C_ a float, scores_ (folds, l1_ratios, Cs)
            self.C = float(clf.C_)
            self.cv_accuracy = float(np.asarray(clf.scores_).mean(axis=0).max())
        else:  # C_ (1,), scores_ {class: (folds, Cs)}
            self.C = float(clf.C_[0])
            self.cv_accuracy = float(clf.scores_[1.0].mean(axis=0).max())
        return self

    def reward(self, prompts, responses) -> np.ndarray:
        """(n,) rewards ``w . phi(x, y)``."""
        return np.asarray(self.features(list(prompts), list(responses)) @ self.w).ravel()

    def __call__(self, prompts, a, b) -> np.ndarray:
        """(n,) ``P(a > b) = sigma(r(x, a) - r(x, b))``."""
        return sigmoid(self.reward(prompts, a) - self.reward(prompts, b))

    def accuracy(self, prompts, chosen, rejected) -> float:
        """Share of pairs where ``r(chosen) > r(rejected)`` (ties count 1/2)."""
        d = self.reward(prompts, chosen) - self.reward(prompts, rejected)
        return float(np.mean((d > 0) + 0.5 * (d == 0)))
