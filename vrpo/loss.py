"""Pairwise preference losses on margins, and the VR objective built from them.

This module is the single definition of the loss used by every part of the
suite: the batched BT/VR solver in :mod:`vrpo.fit`, the simulations in
``sim``, the real-data reward models and the DPO/VRPO trainer in ``llm``.

Every function works unchanged on NumPy arrays and on PyTorch tensors (the
only backend-specific primitive is :func:`log_sigmoid`), so the torch code in
``llm`` differentiates exactly the expression that the NumPy code evaluates.

Notation (docs/method.md section 2): ``delta`` is a margin
``r(x, y1) - r(x, y2)`` (or the DPO implicit-reward margin), ``q`` in [0, 1]
a soft label (``Z``, a tie ``1/2``, or an auxiliary probability ``g``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "LOSSES",
    "log_sigmoid",
    "sigmoid",
    "logistic_loss",
    "hinge_loss",
    "ipo_loss",
    "pairwise_loss",
    "vr_objective",
]


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def log_sigmoid(x):
    """Numerically stable ``log sigma(x)`` for NumPy arrays or torch tensors."""
    if _is_torch(x):
        import torch.nn.functional as F

        return F.logsigmoid(x)
    return -np.logaddexp(0.0, -np.asarray(x, dtype=float))


def sigmoid(x):
    """``sigma(x) = 1 / (1 + exp(-x))`` for NumPy arrays or torch tensors."""
    if _is_torch(x):
        return x.sigmoid()
    from scipy.special import expit

    return expit(x)


def logistic_loss(delta, q):
    """BT / DPO-sigmoid loss ``l(delta, q) = -q log s(delta) - (1-q) log s(-delta)``.

    Linear in ``q``, so ``E_{Z~Bern(g)} l(delta, Z) = l(delta, g)`` (docs/method.md s2).
    ``q = 1`` gives the DPO sigmoid loss ``-log sigma(delta)``.
    Shapes broadcast; returns the elementwise loss.
    """
    return -q * log_sigmoid(delta) - (1 - q) * log_sigmoid(-delta)


def hinge_loss(delta, q):
    """Soft-label hinge (SLiC-style): ``q max(0, 1-delta) + (1-q) max(0, 1+delta)``."""
    if _is_torch(delta):
        relu = lambda v: v.clamp(min=0)  # noqa: E731
    else:
        relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    return q * relu(1 - delta) + (1 - q) * relu(1 + delta)


def ipo_loss(delta, q, tau: float = 0.1):
    """Soft-label IPO loss ``q (delta - 1/(2 tau))^2 + (1-q) (delta + 1/(2 tau))^2``.

    ``tau`` is IPO's regularisation (TRL's ``beta`` for ``loss_type='ipo'``);
    linear in ``q`` like the others, so the VR identities hold for it too.
    """
    h = 1.0 / (2.0 * tau)
    return q * (delta - h) ** 2 + (1 - q) * (delta + h) ** 2


LOSSES = {"logistic": logistic_loss, "hinge": hinge_loss, "ipo": ipo_loss}


def pairwise_loss(delta, q, kind: str = "logistic"):
    """Dispatch to one of :data:`LOSSES` by name (``logistic`` | ``hinge`` | ``ipo``)."""
    try:
        fn = LOSSES[kind]
    except KeyError:
        raise ValueError(f"unknown pairwise loss {kind!r}; choose one of {sorted(LOSSES)}") from None
    return fn(delta, q)


def _is_zero(lam) -> bool:
    """``lam == 0`` for Python numbers, 0-d arrays and one-element tensors alike."""
    try:
        return float(lam) == 0.0
    except (TypeError, ValueError, RuntimeError):
        return False


def _mean(x):
    return x.mean() if _is_torch(x) else np.mean(x)


def vr_objective(delta, Z, g=None, delta_aux=None, g_aux=None, lam=1.0, kind: str = "logistic"):
    """The variance-reduced objective ``L_VR`` of docs/method.md section 2 (one replication).

    ``L_VR = mean_i[ l(delta_i, Z_i) - lam l(delta_i, g_i) ] + lam mean_j l(delta_aux_j, g_aux_j)``

    - ``delta, Z, g``: ``(n,)`` margins, labels and auxiliary probabilities of the
      labelled pairs.
    - ``delta_aux, g_aux``: margins and auxiliary probabilities of the extra pairs,
      either ``(n, M)`` (M pairs sharing each labelled prompt) or ``(N,)`` (fresh
      prompts). With equal pair counts per prompt the plain mean over all extra
      pairs equals ``(1/(nM)) sum_i sum_m``.

    ``lam = 0`` is the plain BT-MLE / DPO objective (``g`` and the extra pairs are
    ignored); ``lam = 1`` the paper's VR/VRPO objective. Returns a scalar.
    """
    base = _mean(pairwise_loss(delta, Z, kind))
    if _is_zero(lam):
        return base
    if g is None or delta_aux is None or g_aux is None:
        raise ValueError("vr_objective with lam != 0 needs g, delta_aux and g_aux")
    return base - lam * _mean(pairwise_loss(delta, g, kind)) + lam * _mean(pairwise_loss(delta_aux, g_aux, kind))
