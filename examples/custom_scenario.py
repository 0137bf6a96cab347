"""A custom misspecification scenario, usable from configs and the CLI:

    vrpo run --plugins examples/custom_scenario.py --scenarios bt saturating:2 --reps 100
"""

import numpy as np

from sim import Scenario, register_scenario, sigmoid


@register_scenario("saturating")
class Saturating(Scenario):
    """Annotators stop distinguishing large differences: p* = sigma(c tanh(du / c)), c = 1 + 1/kappa."""

    default_kappa = 1.0

    def p_star(self, x, phi1, phi2):
        c = 1.0 + 1.0 / max(self.kappa, 1e-12)
        return sigmoid(c * np.tanh(self.du(phi1, phi2) / c))
