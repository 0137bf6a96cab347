"""Cross-fitted logistic auxiliary model ``g``, batched over replications and folds.

The VR estimator needs a ``g`` that has not seen the label it is paired with
(docs/method.md, the ``g`` zoo). One helper serves every caller (the bandit
``learned`` model in :mod:`sim.aux_models`, the HH experiment in
:mod:`llm.hh_reward`), so the fold rule and the treatment of extra pairs are
written once.
"""

from __future__ import annotations

import numpy as np

from .fit import fit_bt
from .loss import sigmoid

__all__ = ["cross_fit_logistic", "fold_of"]


def fold_of(n: int, k_folds: int) -> np.ndarray:
    """Fold of labelled pair ``i``: ``i mod K``, shape ``(n,)``.

    Labelled pairs are i.i.d. draws, so any fixed assignment is a random split;
    fold sizes differ by at most one.
    """
    return np.arange(n) % k_folds


def cross_fit_logistic(F, Z, F_aux, k_folds: int, *, ridge: float, warn: bool = False):
    """K-fold cross-fitted ``g = sigma(F . w_k)`` with ``w_k`` the ridge BT-MLE fit off fold ``k``.

    ``F``: ``(R, n, p)`` features of the labelled pairs, ``Z``: ``(R, n)`` labels;
    ``F_aux``: ``(R, n, M, p)`` extra pairs sharing the labelled prompts, or
    ``(R, N, p)`` extra pairs on fresh prompts. No intercept, so antisymmetric
    features give ``g(x, b, a) = 1 - g(x, a, b)``.

    Labelled pair ``i`` (fold :func:`fold_of`) and the extra pairs sharing its
    prompt get the model fitted without ``i``'s fold; extra pairs on fresh
    prompts get the mean of the ``K`` fold models' probabilities. ``w_k``
    minimises the mean logistic loss plus ``ridge/2 |w|^2`` (:func:`vrpo.fit_bt`,
    ``lam = 0``); folds with the same training size are fitted in one batched
    call. ``warn``: pass :class:`vrpo.ConvergenceWarning` through.

    Returns ``(g (R, n), g_aux (R, n, M) or (R, N))``.
    """
    F = np.asarray(F, dtype=float)
    F_aux = np.asarray(F_aux, dtype=float)
    if F.ndim != 3:
        raise ValueError(f"F must have shape (R, n, p), got {F.shape}")
    R, n, p = F.shape
    K = int(k_folds)
    if not 2 <= K <= n:
        raise ValueError(f"k_folds must lie in [2, n = {n}], got {k_folds}")
    same = F_aux.ndim == 4
    if F_aux.ndim not in (3, 4) or F_aux.shape[0] != R or F_aux.shape[-1] != p or (same and F_aux.shape[1] != n):
        raise ValueError(f"F_aux must have shape (R, n, M, p) or (R, N, p) with R = {R}, n = {n}, p = {p}; "
                         f"got {F_aux.shape}")
    fold = fold_of(n, K)  # (n,)
    W = np.empty((R, K, p))
    size = np.bincount(fold, minlength=K)  # (K,)
    for s in np.unique(size):
        ks = np.flatnonzero(size == s)  # folds whose training set has n - s pairs
        train = np.stack([np.flatnonzero(fold != k) for k in ks])  # (k', n - s)
        W[:, ks] = fit_bt(F[:, train], np.asarray(Z, dtype=float)[:, train], lam=0, ridge=ridge, warn=warn).theta
    W_i = W[:, fold]  # (R, n, p): the model not trained on pair i
    g = sigmoid(np.einsum("rnp,rnp->rn", F, W_i))  # (R, n)
    if same:
        g_aux = sigmoid(np.einsum("rnmp,rnp->rnm", F_aux, W_i))  # (R, n, M)
    else:
        # (R, N): mean over the fold models, summed fold by fold
        g_aux = sum(sigmoid(np.einsum("rNp,rp->rN", F_aux, W[:, k])) / K for k in range(K))
    return g, g_aux
