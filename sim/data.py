"""Sampling labelled and extra pairs from the bandit (one replication, then stacked).

Labelled data: ``n`` prompts ``x_i``, two responses ``y_i1, y_i2 ~ pi_ref(.|x_i)``
drawn independently, label ``Z_i`` from the scenario. Extra pairs (no label):
``M`` per labelled prompt (``aux_prompts="same"``, shapes ``(n, M)``) or ``M n``
pairs on fresh prompts (``aux_prompts="fresh"``, shapes ``(N,)``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from .bandit import Bandit
from .scenarios import Scenario

AUX_PROMPTS = ("same", "fresh")


@dataclass
class PairData:
    """Pairs of one or many replications (leading axes ``...``).

    ``x (..., n, dx)``, ``phi1, phi2 (..., n, d)``, ``p_star, Z (..., n)``; extra pairs
    ``x_aux (..., A, dx)``, ``phi1_aux, phi2_aux (..., A, d)``, ``p_star_aux (..., A)``
    where ``A = (n, M)`` (same prompts) or ``(N,)`` (fresh prompts).
    ``p_star`` is the true ``p*(x, y1, y2)``; only an auxiliary model that simulates an
    annotator of known quality (``oracle``, ``noisy``) may read it.
    """

    x: np.ndarray
    phi1: np.ndarray
    phi2: np.ndarray
    p_star: np.ndarray
    Z: np.ndarray
    x_aux: np.ndarray
    phi1_aux: np.ndarray
    phi2_aux: np.ndarray
    p_star_aux: np.ndarray
    aux_prompts: str

    @property
    def X(self) -> np.ndarray:
        """Margin features ``phi1 - phi2`` of the labelled pairs, ``(..., n, d)``."""
        return self.phi1 - self.phi2

    @property
    def X_aux(self) -> np.ndarray:
        """Margin features of the extra pairs, ``(..., n, M, d)`` or ``(..., N, d)``."""
        return self.phi1_aux - self.phi2_aux

    @property
    def n(self) -> int:
        return self.Z.shape[-1]

    @staticmethod
    def stack(items: list["PairData"]) -> "PairData":
        """Stack replications along a new leading axis."""
        kw = {f.name: np.stack([getattr(it, f.name) for it in items]) for f in fields(PairData) if f.name != "aux_prompts"}
        return PairData(aux_prompts=items[0].aux_prompts, **kw)


def sample_pairs(
    rng: np.random.Generator, bandit: Bandit, scenario: Scenario, n: int, M: int, aux_prompts: str = "same"
) -> PairData:
    """One replication of ``n`` labelled pairs and their extra pairs."""
    if aux_prompts not in AUX_PROMPTS:
        raise ValueError(f"aux_prompts must be one of {AUX_PROMPTS}, got {aux_prompts!r}")
    ctx = bandit.sample_contexts(rng, n)
    arms = bandit.sample_arms(rng, ctx.log_pi_ref, (2,))  # (n, 2)
    rows = np.arange(n)
    phi1, phi2 = ctx.phi[rows, arms[:, 0]], ctx.phi[rows, arms[:, 1]]  # (n, d)
    p = scenario.p_star(ctx.x, phi1, phi2)
    Z = scenario.sample_labels(rng, ctx.x, phi1, phi2, p)
    if aux_prompts == "same":
        aarms = bandit.sample_arms(rng, ctx.log_pi_ref, (M, 2))  # (n, M, 2)
        phi1a = ctx.phi[rows[:, None], aarms[..., 0]]  # (n, M, d)
        phi2a = ctx.phi[rows[:, None], aarms[..., 1]]
        xa = np.broadcast_to(ctx.x[:, None, :], (n, M, ctx.x.shape[-1]))
    else:
        N = M * n
        actx = bandit.sample_contexts(rng, N)
        aarms = bandit.sample_arms(rng, actx.log_pi_ref, (2,))  # (N, 2)
        arows = np.arange(N)
        phi1a, phi2a = actx.phi[arows, aarms[:, 0]], actx.phi[arows, aarms[:, 1]]  # (N, d)
        xa = actx.x
    pa = scenario.p_star(xa, phi1a, phi2a)
    return PairData(x=ctx.x, phi1=phi1, phi2=phi2, p_star=p, Z=Z, x_aux=np.ascontiguousarray(xa), phi1_aux=phi1a,
                    phi2_aux=phi2a, p_star_aux=pa, aux_prompts=aux_prompts)
