"""``vrpo run``: the Monte Carlo sweep (the main job), results table + regret-vs-n figure.

Also the sweep plumbing ``vrpo theory`` shares: the config flags, plugins, the output
name derived from the config, and the guard against replacing another sweep's file.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from .configargs import ConfigFlags, available_cores
from .errors import UserError, check_writable

HELP = "run a Monte Carlo sweep (defaults: the main job; results/<scenarios>-<config hash>.parquet)"

SWEEP_HELPS = {
    "name": "sweep name (progress bar; also the stem of the default output name)",
    "scenarios": "scenario specs name[:kappa] (bt, probit, heavy-tail, mixture, flip, hetero, intransitive, "
                 "nonlinear, position, ties, ... and plugins')",
    "d": "feature dimension of the bandit (each n must be >= d)",
    "K": "arms per context",
    "dx": "context dimension",
    "scale": "scale of theta_0 (sharpness of the preferences)",
    "beta": "KL strength of the policies evaluated (regret, win rates)",
    "pi_ref": "reference policy over arms",
    "n": "labelled sample sizes (each >= 2 and >= d)",
    "M": "unlabelled extra pairs per prompt for the VR estimators",
    "aux_prompts": "'same' (extra pairs on the labelled prompts) or 'fresh' (new prompts)",
    "g": "auxiliary models: oracle, noisy:s, biased:deg, learned:K, self, constant:c",
    "methods": None,  # filled from sim.config.METHODS_HELP in register()
    "reps": "Monte Carlo replications per cell (>= 2)",
    "seed": "master seed (one seed determines everything)",
    "alpha": "level of the confidence intervals (coverage)",
    "n_pop": "contexts averaged for theta* (its Monte Carlo SE is printed)",
    "n_eval": "contexts for regret and win-rate evaluation",
    "chunk_size": "replications per task (memory bound; results do not depend on it)",
    "n_jobs": "parallel workers, -1 = all cores (results do not depend on it)",
    "backend": "joblib backend: loky, threading, sequential, dask (extra 'dask') or ray (extra 'ray')",
    "output": "results table (.parquet or .csv); another sweep's file is never replaced without --force",
}


def sweep_flags() -> ConfigFlags:
    return ConfigFlags("sim.config:ExperimentConfig", helps=SWEEP_HELPS, section="experiment",
                       cli_defaults={"n_jobs": available_cores()},
                       default_text={"n_jobs": f"the available cores, {available_cores()} here",
                                     "output": "results/<name or scenarios>-<hash of the config>.parquet"})


def import_plugins(specs) -> None:
    """Import user modules (dotted names or ``.py`` paths) that register scenarios or g's.
    A module that cannot be found or does not compile is a :class:`UserError` (one line);
    an exception raised by the plugin's own code keeps its traceback."""
    import importlib
    import importlib.util

    for spec in specs or ():
        try:
            if spec.endswith(".py"):
                path = Path(spec)
                if not path.is_file():
                    raise UserError(f"plugin file not found: {path}")
                mod_spec = importlib.util.spec_from_file_location(path.stem, path)
                module = importlib.util.module_from_spec(mod_spec)
                mod_spec.loader.exec_module(module)
            else:
                importlib.import_module(spec)
        except SyntaxError as e:
            where = f"{e.filename}:{e.lineno}" if e.filename else spec
            raise UserError(f"plugin {spec}: syntax error at {where}: {e.msg}") from e
        except ModuleNotFoundError as e:
            raise UserError(f"plugin {spec}: {e} (give an importable module name or a .py file)") from e
        except ImportError as e:
            raise UserError(f"plugin {spec}: {e}") from e


def add_config_arguments(p) -> None:
    """Flags for every :class:`ExperimentConfig` field, ``--config``, ``--plugins``, ``--force``."""
    from sim.config import METHODS_HELP

    SWEEP_HELPS["methods"] = METHODS_HELP
    p.add_argument("--plugins", nargs="+", metavar="MODULE_OR_FILE",
                   help="modules or .py files to import first (custom scenarios / auxiliary models) (default: none)")
    p.add_argument("--force", action="store_true",
                   help="replace --output even if it holds the results of a different configuration")
    sweep_flags().add_to(p)


def default_output(cfg) -> str:
    """``results/<stem>-<hash>.parquet``: the stem is ``name`` (or the scenarios when it is
    ``default``), the hash covers every result-changing field, so two sweeps never share it."""
    ident = json.dumps(cfg.identity(), sort_keys=True, default=str)
    h = hashlib.sha256(ident.encode()).hexdigest()[:8]
    stem = cfg.name if cfg.name != "default" else "_".join(cfg.scenarios)
    stem = re.sub(r"[^A-Za-z0-9.+_-]+", "-", stem).strip("-.")[:60] or "sweep"
    return f"results/{stem}-{h}.parquet"


def stored_identity(path) -> dict | None:
    """The result-changing config embedded in a results file, without parsing it (a plugin
    scenario that is not loaded is fine); ``None`` if unreadable or not a vrpo results file."""
    from sim.config import ExperimentConfig
    from sim.runner import read_results

    try:
        _, meta = read_results(path)
        old = meta["config"]
    except Exception:  # noqa: BLE001 -- any unreadable file is a cache miss
        return None
    if not isinstance(old, dict):
        return None
    return {k: v for k, v in old.items() if k not in ExperimentConfig._EXEC_FIELDS}


def same_config(path, cfg) -> bool:
    ident = stored_identity(path)
    return ident is not None and json.loads(json.dumps(ident)) == json.loads(json.dumps(cfg.identity()))


def preflight(cfg) -> None:
    """Build every scenario and auxiliary model of ``cfg`` once, so a bad argument
    (``flip:0.9``, ``noisy:-1``) is reported before any work, naming the spec."""
    from sim.aux_models import make_aux
    from sim.bandit import Bandit
    from sim.scenarios import make_scenario

    bandit = Bandit(cfg.bandit_spec)
    for s in cfg.scenarios:
        try:
            sc = make_scenario(s, bandit)
        except (ValueError, TypeError, KeyError) as e:
            raise UserError(e.args[0] if isinstance(e, KeyError) and e.args else str(e)) from e
        for g in cfg.g:
            try:
                make_aux(g, sc)
            except (ValueError, TypeError, KeyError) as e:
                msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
                raise UserError(str(msg) if "auxiliary model" in str(msg) else f"auxiliary model {g!r}: {msg}") from e


def config_from_args(args, *, guard: bool = True):
    """The validated sweep config; output derived from the config unless given; output checked
    (suffix, writable, not another configuration's results unless ``--force``; ``guard=False``:
    the sweep's output is not written) before any work."""
    from sim.runner import check_output

    import_plugins(getattr(args, "plugins", None))
    flags = sweep_flags()
    file_vals = flags.from_file(args)
    explicit = "output" in file_vals or getattr(args, "output", None) is not None
    cfg = flags.build(args)
    preflight(cfg)
    if not explicit:
        cfg = cfg.replace(output=default_output(cfg))
    try:
        check_output(cfg)
    except ValueError as e:
        raise UserError(str(e)) from e
    check_writable(cfg.output)
    out = Path(cfg.output)
    if guard and explicit and out.exists() and not getattr(args, "force", False) and not same_config(out, cfg):
        why = ("holds the results of a different configuration" if stored_identity(out) is not None
               else "exists and is not a results file of this suite")
        raise UserError(f"{out} {why}; choose another --output, omit --output (a name derived from the config), "
                        "or pass --force to replace it")
    return cfg


def _run(args) -> int:
    cfg = config_from_args(args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    import numpy as np

    from analysis.plots import plot_regret_vs_n
    from sim.runner import read_results, run_experiment
    from sim.summary import format_summary, summarize

    df = run_experiment(cfg, resume=not args.fresh)
    summ = summarize(df)
    print(format_summary(summ))
    out = Path(cfg.output)
    fig = out.with_name(out.stem + "_regret_vs_n.png")
    plot_regret_vs_n(summ, fig)
    nonconv = int(summ["nonconverged"].sum())
    if nonconv:
        counts = df.loc[~df["converged"].astype(bool), "status"].value_counts()
        why = ", ".join(f"{k} {v}" for k, v in counts.items())
        print(f"note: {nonconv} of {len(df)} fit(s) have no certified minimiser ({why}: see vrpo.separation."
              "STATUS_HELP); they are flagged in the table's 'converged' and 'status' columns and excluded from the "
              "summary (column 'excluded')")
    _, meta = read_results(out)
    for s, se in meta.get("theta_star_se", {}).items():
        print(f"theta* ({s}): {np.round(meta['theta_star'][s], 4).tolist()}  Monte Carlo SE <= {max(se):.1e} "
              f"({cfg.n_pop} contexts, exact over arms)")
    print(f"results: {out}\nfigure:  {fig}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("run", help=HELP,
                       description="Monte Carlo sweep over scenarios x n x auxiliary models x methods. Writes a tidy "
                       "results table with the resolved config embedded, and a regret-vs-n figure beside it. "
                       "Without --output the table is results/<name or scenarios>-<config hash>.parquet, so "
                       "sweeps of different configurations never overwrite each other; rerunning the same "
                       "configuration resumes from its cached cells. List flags take spaces or commas.")
    add_config_arguments(p)
    p.add_argument("--fresh", action="store_true", help="ignore cached cells and recompute everything")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_run)
