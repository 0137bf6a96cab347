"""vrpo: the method's math, once.

Variance-reduced preference estimation (Ye et al., arXiv 2504.03784; docs/method.md):
pure functions over arrays, no I/O. ``sim``, ``analysis`` and ``llm`` import it.

- :func:`fit_bt`: batched BT-MLE (``lam=0``), VR (``lam=1``) and power-tuned VR
  (``lam="auto"``) with sandwich covariances and Wald intervals.
- :mod:`vrpo.loss`: the pairwise loss on margins and the VR objective (NumPy or torch).
- :mod:`vrpo.variance`: per-pair scores, Hessians, ``V = A Sigma(lam) A`` and ``lam*``.
"""

from .fit import ConvergenceWarning, FitResult, VRPOInputError, fit_bt, fit_bt_population
from .loss import LOSSES, hinge_loss, ipo_loss, log_sigmoid, logistic_loss, pairwise_loss, sigmoid, vr_objective
from .variance import VarianceParts, pair_hessian, pair_score, wcov

__all__ = [
    "fit_bt",
    "fit_bt_population",
    "FitResult",
    "VRPOInputError",
    "ConvergenceWarning",
    "LOSSES",
    "logistic_loss",
    "hinge_loss",
    "ipo_loss",
    "pairwise_loss",
    "vr_objective",
    "log_sigmoid",
    "sigmoid",
    "VarianceParts",
    "pair_score",
    "pair_hessian",
    "wcov",
]
__version__ = "0.1.0"
