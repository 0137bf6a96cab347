"""``vrpo run``: the Monte Carlo sweep (the main job), results table + regret-vs-n figure."""

from __future__ import annotations

import json
from pathlib import Path

from sim.config import METHODS_HELP, ExperimentConfig

_LIST_FIELDS = {"scenarios": str, "n": int, "g": str, "methods": str}
_SCALAR_FIELDS = {"name": str, "d": int, "K": int, "dx": int, "scale": float, "beta": float, "pi_ref": str, "M": int,
                  "aux_prompts": str, "reps": int, "seed": int, "alpha": float, "n_pop": int, "n_eval": int,
                  "chunk_size": int, "n_jobs": int, "backend": str, "output": str}


def import_plugins(specs) -> None:
    """Import user modules (dotted names or ``.py`` paths) that register scenarios or g's."""
    import importlib
    import importlib.util

    for spec in specs or ():
        if spec.endswith(".py"):
            path = Path(spec)
            if not path.exists():
                raise SystemExit(f"plugin file not found: {path}")
            mod_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)


def add_config_arguments(p) -> None:
    """CLI flags for every :class:`ExperimentConfig` field (they override the config file)."""
    p.add_argument("--config", type=Path, help="TOML or YAML experiment config (flags override it)")
    p.add_argument("--plugins", nargs="+", metavar="MODULE_OR_FILE",
                   help="modules or .py files to import first (custom scenarios / auxiliary models)")
    for name, typ in _LIST_FIELDS.items():
        help_ = {"methods": METHODS_HELP, "g": "auxiliary models: oracle, noisy:s, biased:deg, learned:K, self, "
                 "constant:c", "scenarios": "scenario specs name[:kappa]"}.get(name)
        p.add_argument(f"--{name.replace('_', '-')}", nargs="+", type=typ, default=None, help=help_)
    for name, typ in _SCALAR_FIELDS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=typ, default=None, dest=name)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def config_from_args(args) -> ExperimentConfig:
    import_plugins(getattr(args, "plugins", None))
    cfg = ExperimentConfig.from_file(args.config) if args.config else ExperimentConfig()
    over = {k: getattr(args, k) for k in list(_LIST_FIELDS) + list(_SCALAR_FIELDS) if getattr(args, k) is not None}
    if args.no_progress:
        over["progress"] = False
    return cfg.replace(**{k: tuple(v) if isinstance(v, list) else v for k, v in over.items()})


def _run(args) -> int:
    from analysis.plots import plot_regret_vs_n
    import numpy as np

    from sim.runner import read_results, run_experiment
    from sim.summary import format_summary, summarize

    cfg = config_from_args(args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
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
    p = sub.add_parser("run", help="run a Monte Carlo sweep (defaults: the main job, < 3 min on 2 cores)",
                       description="Monte Carlo sweep over scenarios x n x auxiliary models x methods. Writes a tidy "
                       "results table with the resolved config embedded, and a regret-vs-n figure beside it.")
    add_config_arguments(p)
    p.add_argument("--fresh", action="store_true", help="ignore cached cells and recompute everything")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_run)
