"""``vrpo figures``: the paper figure set F1-F6 and paper_figures/REPORT.md, from cached sweeps."""

from __future__ import annotations

import time


def _figures(args) -> int:
    from analysis.figures import build_figure_set
    from analysis.report import write_report

    t0 = time.time()
    fs = build_figure_set(args.out_dir, smoke=args.smoke, n_jobs=args.n_jobs, formats=tuple(args.formats),
                          progress=not args.no_progress, fresh=args.fresh, n_ctx=args.n_ctx,
                          only=tuple(args.only) if args.only else None)
    report = None if args.only else write_report(fs)
    for f in fs.figures:
        print(f"{f['id']}: " + ", ".join(str(p) for p in f["paths"]))
    if report:
        print(f"report: {report}")
    t = fs.timings
    print(f"sweeps + theory {t['sweeps_and_theory']:.1f} s ({'all from cache' if fs.data.get('all_cached') else 'computed'}), "
          f"figures {t['figures']:.1f} s, total {time.time() - t0:.1f} s")
    return 0


def register(sub) -> None:
    p = sub.add_parser("figures", help="regenerate the paper figures F1-F6 and REPORT.md (cached sweeps)",
                       description="Runs (or reads from <out-dir>/cache) the figure sweeps, computes the population "
                       "theory and the theory-vs-simulation tables, draws F1-F6 (PNG and PDF) and writes "
                       "<out-dir>/REPORT.md, including every <out-dir>/sections/*.md fragment.")
    p.add_argument("--out-dir", default="paper_figures", help="figure directory (default paper_figures)")
    p.add_argument("--smoke", action="store_true", help="tiny configuration (seconds; numbers not meaningful)")
    p.add_argument("--n-jobs", type=int, default=2, help="joblib workers for the sweeps (default 2)")
    p.add_argument("--formats", nargs="+", default=["png", "pdf"], help="figure formats (default png pdf)")
    p.add_argument("--only", nargs="+", metavar="FIG", help="only these figures (e.g. F1 F3); no report")
    p.add_argument("--n-ctx", type=int, default=None, help="theory contexts (default 20000; smoke 2000)")
    p.add_argument("--fresh", action="store_true", help="recompute every sweep, ignoring cached results")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_figures)
