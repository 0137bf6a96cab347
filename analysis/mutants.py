"""Deliberately wrong versions of the theory and of the estimator (mutation tests).

A validation that cannot fail proves nothing. Each mutant below is a plausible error in
the asymptotic theory of docs/method.md s3 or in the estimator's inference; ``vrpo validate``
(:mod:`analysis.validate`) compares each with the same simulated statistic as the
correct version, and must reject every mutant while passing the correct one.

Theory mutants act on a :class:`~analysis.theory.PopulationTheory` (through its stored
moments, :meth:`~analysis.theory.PopulationTheory.variant`):

- ``no-1/M``: ``V`` without the ``1/M`` factor: the mean of the ``M`` extra pairs
  treated as exact, ``S2 = E_x Cov(u|x)`` instead of ``(1 + 1/M) E_x Cov(u|x)``;
- ``wrong-prompts``: the between-prompt term handled as in the other design: for
  extra pairs that share the labelled prompt, the fresh-prompt formula (which also
  removes ``Var_x E[m|x]``), and for fresh prompts the shared-prompt one;
- ``naive-lam``: PPI++'s ``lam*`` that ignores clustering, i.e. treats the ``n M``
  extra pairs as independent of the labelled pairs and of each other (the
  fresh-prompt ``lam*`` applied to shared prompts);
- ``model-based``: ``V = H^-1``, the inverse Fisher information of a correctly
  specified BT model (no sandwich);
- ``G-ref``: the regret constant ``tr(G V) / (2 beta)`` with ``G`` taken under
  ``pi_ref`` instead of ``pi_theta*``.

Estimator mutants are alternative covariance estimates built from ``vrpo``'s public
pieces (per-pair scores, Hessians, :class:`vrpo.VarianceParts`), never by editing
``vrpo``:

- ``labelled-hessian``: the sandwich with the Hessian of the labelled pairs only
  (:func:`cov_labelled_hessian`) instead of the pooled one ``fit_bt`` uses;
- ``unclustered``: the sandwich that treats the extra pairs as independent of their
  labelled pair and of each other (:func:`cov_unclustered`), i.e. no clustering by prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import vrpo
from vrpo.variance import VarianceParts, pair_hessian, pair_score

__all__ = ["Mutant", "MUTANTS", "theory_mutant", "naive_lam", "cov_labelled_hessian", "cov_unclustered"]


@dataclass(frozen=True)
class Mutant:
    """A deliberately wrong version of one ingredient.

    ``name``: short id; ``what``: the error in words; ``kind``: ``"theory"`` or
    ``"estimator"``; ``statistic``: the simulated statistic that must reject it.
    """

    name: str
    what: str
    kind: str
    statistic: str


MUTANTS = {
    m.name: m
    for m in (
        Mutant("no-1/M", "V without the 1/M factor (the mean of the M extra pairs treated as exact)", "theory",
               "variance ratio VR/MLE"),
        Mutant("wrong-prompts", "V with the between-prompt term of the other design (same vs fresh prompts)",
               "theory", "variance ratio VR/MLE"),
        Mutant("naive-lam", "PPI++ lam* that ignores clustering by prompt (extra pairs treated as independent)",
               "theory", "variance-minimising lam"),
        Mutant("model-based", "V = H^-1 (BT Fisher information, no sandwich)", "theory", "n tr Cov of the MLE"),
        Mutant("G-ref", "regret constant with G under pi_ref instead of pi_theta*", "theory", "n E[regret]"),
        Mutant("labelled-hessian", "sandwich with the labelled-pair Hessian only", "estimator",
               "mean sandwich / simulated variance"),
        Mutant("unclustered", "sandwich not clustered by prompt (extra pairs treated as independent)", "estimator",
               "95% Wald coverage"),
    )
}


# --------------------------------------------------------------------------- theory mutants


def theory_mutant(th, name: str):
    """The :class:`~analysis.theory.PopulationTheory` of mutant ``name`` (``no-1/M``,
    ``wrong-prompts``, ``G-ref``), built from the same moments as ``th``."""
    if name == "no-1/M":
        return th.variant(aux_factor=1.0, label=f"{th.g} [no-1/M]")
    if name == "wrong-prompts":
        other = "fresh" if th.aux_prompts == "same" else "same"
        return th.variant(aux_prompts=other, label=f"{th.g} [{other}-prompt formula]")
    if name == "G-ref":
        return th.variant(G="G_ref", label=f"{th.g} [G under pi_ref]")
    raise KeyError(f"no theory variant for mutant {name!r}")


def naive_lam(th, clip=None) -> float:
    """PPI++'s ``lam*`` computed as if the ``n M`` extra pairs were independent of the labelled
    pairs and of each other (mutant ``naive-lam``): for shared prompts this is the fresh-prompt
    ``lam*``; with ``g = p*`` it coincides with the clustered one, ``M / (M + 1)``."""
    return float(th.variant(aux_prompts="fresh").lam_opt(clip=clip))


def model_based_trV(th) -> float:
    """``tr H^-1``: the MLE's variance if BT were the true model (mutant ``model-based``)."""
    return float(np.trace(th.parts.A))


# --------------------------------------------------------------------------- estimator mutants


def cov_labelled_hessian(fit: vrpo.FitResult, X) -> np.ndarray:
    """Mutant ``labelled-hessian``: ``fit``'s sandwich with the Hessian of the labelled pairs only.

    ``X``: ``(..., n, d)`` labelled margin features. The meat (``fit.parts.S0/S1/S2``, clustered
    by prompt) is unchanged; only the bread ``A = H^-1`` differs. Returns ``(..., d, d)``.
    """
    H_lab = pair_hessian(fit.theta, np.asarray(X, float))  # (..., d, d)
    P = fit.parts
    return VarianceParts(A=np.linalg.inv(H_lab), S0=P.S0, S1=P.S1, S2=P.S2, n=P.n).cov(fit.lam)


def cov_unclustered(fit: vrpo.FitResult, X, Z, g, X_aux, g_aux) -> np.ndarray:
    """Mutant ``unclustered``: the sandwich that ignores that extra pairs share their labelled prompt.

    Every row is treated as an independent observation: the labelled pairs contribute
    ``a - lam u0`` (``a = (s - Z) X``, ``u0 = (s - g) X``) and the ``N = n M`` extra pairs
    ``lam u_m`` (``u_m = (s_m - g_m) X_m``), so ``n Cov = A [Cov(a - lam u0) + lam^2 (n/N) Cov(u_m)] A``
    with the pooled Hessian of ``fit``. This is the fresh-prompt sandwich applied to
    shared-prompt data. ``X_aux (..., n, M, d)``, ``g_aux (..., n, M)``. Returns ``(..., d, d)``.
    """
    X_aux = np.asarray(X_aux, float)
    th = fit.theta
    a = pair_score(th, X, Z)  # (..., n, d)
    u0 = pair_score(th, X, g)  # (..., n, d)
    lead = X_aux.shape[:-3]
    n, M, d = X_aux.shape[-3:]
    Xa = X_aux.reshape(lead + (n * M, d))
    ua = pair_score(th, Xa, np.asarray(g_aux, float).reshape(lead + (n * M,)))  # (..., nM, d)
    return VarianceParts.from_scores(fit.hessian, a, -u0, ua, n_over_N=1.0 / M).cov(fit.lam)
