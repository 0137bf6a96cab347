"""The policy demo's learned judge (llm.judge): no scikit-learn FutureWarning, same fit as the legacy API."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn")


def _texts(n=120, seed=0):
    rng = np.random.default_rng(seed)
    good, bad = ["thanks", "happy", "help", "sure", "great"], ["no", "hate", "refuse", "never", "bad"]
    prompts = [f"question {i}" for i in range(n)]
    chosen = [" ".join(rng.choice(good, 3).tolist() + rng.choice(bad, 1).tolist()) for _ in range(n)]
    rejected = [" ".join(rng.choice(bad, 3).tolist() + rng.choice(good, 1).tolist()) for _ in range(n)]
    return prompts, chosen, rejected


def test_linear_judge_fits_without_future_warnings_and_matches_the_legacy_fit():
    from sklearn.linear_model import LogisticRegressionCV

    from llm.judge import LinearPreferenceModel, TfidfFeatures

    prompts, chosen, rejected = _texts()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        judge = LinearPreferenceModel(TfidfFeatures(), Cs=(0.1, 1.0, 10.0), seed=1).fit(prompts, chosen, rejected)
    assert judge.accuracy(prompts, chosen, rejected) > 0.9
    # the same cross-validated fit through the legacy attributes (warnings silenced)
    feats = judge.features
    diff = (feats(prompts, chosen) - feats(prompts, rejected)).toarray()
    X, y = np.vstack([diff, -diff]), np.r_[np.ones(len(prompts)), np.zeros(len(prompts))]
    folds = np.random.default_rng(1).permutation(np.arange(len(prompts)) % 5)
    cv = [(np.where(np.r_[folds, folds] != k)[0], np.where(np.r_[folds, folds] == k)[0]) for k in range(5)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = LogisticRegressionCV(Cs=[0.1, 1.0, 10.0], cv=cv, fit_intercept=False, max_iter=2000,
                                   scoring="accuracy").fit(X, y)
    np.testing.assert_allclose(judge.w, ref.coef_.ravel(), rtol=1e-12, atol=1e-14)
    scores = ref.scores_[1.0] if isinstance(ref.scores_, dict) else np.asarray(ref.scores_)
    assert judge.C == float(np.ravel(ref.C_)[0])
    assert judge.cv_accuracy == pytest.approx(float(scores.mean(axis=0).max()), abs=1e-15)
