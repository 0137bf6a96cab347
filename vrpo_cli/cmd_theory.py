"""``vrpo theory``: population theory of a sweep, and (by default) theory vs simulation."""

from __future__ import annotations

import time
from pathlib import Path

from .errors import check_writable
from .cmd_run import add_config_arguments, config_from_args, same_config

HELP = "asymptotic theory (tr V, regret constant, optimal lam) vs simulation"


def load_or_run(cfg, fresh: bool = False):
    """``(df, meta, from_cache)``: ``cfg.output`` if it holds this configuration's results, else the
    sweep (resuming from its cached cells). The stored config is compared without being parsed,
    so a stale file (another configuration, a plugin scenario not loaded now, unreadable) is a
    cache miss, not an error."""
    from sim.runner import read_results, run_experiment

    out = Path(cfg.output)
    if out.exists() and not fresh and same_config(out, cfg):
        df, meta = read_results(out)
        return df, meta, True
    run_experiment(cfg, resume=not fresh)
    df, meta = read_results(out)
    return df, meta, False


def _theory(args) -> int:
    import pandas as pd

    from analysis.compare import agreement_summary, compare_table, holm_table, sweep_theories
    from vrpo_common.stats import p_two_sided
    from analysis.theory import theory_cached
    from sim.runner import write_table

    cfg = config_from_args(args, guard=not args.no_sim)  # --no-sim neither reads nor writes the sweep
    out = Path(cfg.output)
    cache = Path(args.theory_cache) if args.theory_cache else out.with_name(out.stem + ".theory")
    check_writable(cache, "theory cache")
    if args.table:
        check_writable(args.table, "table")
    pd.set_option("display.width", 200)
    t0 = time.time()
    if args.no_sim:
        rows = []
        for s in cfg.scenarios:
            for g, th in theory_cached(cfg.bandit_spec, s, cfg.g, cfg.M, cfg.aux_prompts, args.n_ctx, args.n_batches,
                                       cache_dir=cache).items():
                rows += [th.row(m) for m in cfg.methods if m != "mle" or g == cfg.g[0]]
        table = pd.DataFrame(rows)
        print(table.round(4).to_string(index=False))
        print(f"theory for {len(cfg.scenarios)} scenario(s) x {len(cfg.g)} g in {time.time() - t0:.1f} s "
              f"({args.n_ctx} contexts, jackknife over {args.n_batches} batches)")
        if args.table:
            write_table(table, args.table, {"config": cfg.to_dict(), "n_ctx": args.n_ctx})
            print(f"table: {args.table}")
        return 0
    df, meta, hit = load_or_run(cfg, fresh=args.fresh)
    theories, G_eval = sweep_theories(cfg, meta, n_ctx=args.n_ctx, n_batches=args.n_batches, cache_dir=cache)
    table = compare_table(df, cfg, theories, G_eval)
    cols = ["scenario", "g", "method", "n", "ntrcov_sim", "ntrcov_sim_se", "trV_th", "z_cov", "nregret_sim",
            "nregret_sim_se", "regret_const_th", "z_regret", "var_ratio_sim", "var_ratio_sim_se", "var_ratio_th",
            "z_var_ratio", "coverage_sim", "lam_sim", "lam_th"]
    print(table[[c for c in cols if c in table]].round(3).to_string(index=False))
    print()
    print(agreement_summary(table, n_min=args.n_min).to_string(index=False))
    long = holm_table(table, n_min=args.n_min, alpha=args.holm_alpha)
    print(f"\nHolm over {len(long)} comparisons at n >= {args.n_min} (family-wise {args.holm_alpha:g}): "
          f"{int(long['rejected'].sum())} rejected; |z| > 3: {int((long['z'].abs() > 3).sum())} observed, "
          f"{len(long) * p_two_sided(3.0):.2f} expected by chance. These cells share their labelled data across "
          "methods and g (paired by design); `vrpo validate` runs the independent high-power checks.")
    dest = Path(args.table) if args.table else out.with_name(out.stem + "_theory_vs_sim.csv")
    write_table(table, dest, {"config": cfg.to_dict(), "theta_star": meta.get("theta_star"), "n_ctx": args.n_ctx})
    print(f"\nsweep {'read from cache' if hit else 'computed'}; total {time.time() - t0:.1f} s\ntable: {dest}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("theory", help=HELP,
                       description="Computes the population theory of docs/method.md s3 for every scenario x g of the "
                       "sweep and, unless --no-sim, runs (or reads) the sweep and writes the theory-vs-simulation "
                       "table (n tr Cov vs tr V, n E[regret] vs tr(GV)/(2 beta), VR/MLE ratios, coverage, 3-SE flags). The sweep "
                       "is the one `vrpo run` with the same flags writes (same default output name).")
    add_config_arguments(p)
    p.add_argument("--no-sim", action="store_true", help="theory only (no Monte Carlo)")
    p.add_argument("--n-ctx", type=int, default=20000, help="contexts in the theory's sample (default 20000)")
    p.add_argument("--n-batches", type=int, default=20, help="batches for the jackknife SE (default 20)")
    p.add_argument("--n-min", type=int, default=1000, help="smallest n counted in the agreement summary (default 1000)")
    p.add_argument("--holm-alpha", type=float, default=1e-3, help="family-wise level of the Holm correction (default 1e-3)")
    p.add_argument("--table", help="output table (.csv or .parquet) (default: <output>_theory_vs_sim.csv)")
    p.add_argument("--theory-cache", help="theory cache directory (default: <output>.theory/)")
    p.add_argument("--fresh", action="store_true", help="recompute the sweep, ignoring cached cells")
    p.set_defaults(func=_theory)
