"""sim: synthetic contextual bandits with misspecified preferences, and the Monte Carlo runner.

- :mod:`sim.bandit` contexts, arms, ``pi_ref``; :mod:`sim.scenarios` the zoo of ``p*``;
  :mod:`sim.aux_models` the zoo of ``g``; :mod:`sim.data` pair sampling;
  :mod:`sim.population` ``theta*`` and evaluation sets; :mod:`sim.policy` KL policies,
  regret and win rate; :mod:`sim.config` / :mod:`sim.runner` the experiment;
  :mod:`sim.summary` Monte Carlo means and standard errors.
"""

from . import aux_models as _aux_models  # noqa: F401  (registers the built-in g's)
from . import scenarios as _scenarios  # noqa: F401  (registers the built-in scenarios)
from .aux_models import AuxModel, make_aux
from .bandit import Bandit, BanditSpec, Contexts
from .config import ExperimentConfig
from .data import PairData, sample_pairs
from .registry import AUX_MODELS, SCENARIOS, register_aux, register_scenario
from .runner import read_results, run_experiment
from .scenarios import Scenario, make_scenario, sigmoid
from .summary import format_summary, summarize

__all__ = [
    "AuxModel", "make_aux", "Bandit", "BanditSpec", "Contexts", "ExperimentConfig", "PairData", "sample_pairs",
    "AUX_MODELS", "SCENARIOS", "register_aux", "register_scenario", "read_results", "run_experiment", "Scenario",
    "make_scenario", "sigmoid", "format_summary", "summarize",
]
