"""``vrpo figures``: the figure set F1-F7 and REPORT.md, from cached sweeps.

Exploratory by default (``results/figures/``); ``--publish`` writes the published set,
``paper_figures/`` (tracked in git), so the published figures change only on purpose.
"""

from __future__ import annotations

import time

from .configargs import available_cores
from .errors import UserError, check_writable
from .publish import PUBLISH_DIR, output_dir

HELP = "draw the figure set F1-F7 and REPORT.md (results/figures/; --publish: paper_figures/)"
EXPLORE_DIR = "results/figures"


def out_dir(args) -> str:
    return output_dir(args.publish, args.out_dir, EXPLORE_DIR, "--out-dir")


def _figures(args) -> int:
    dest = out_dir(args)
    for name, v in (("--n-jobs", args.n_jobs), ("--n-ctx", args.n_ctx)):
        if v is not None and v < 1:
            raise UserError(f"{name} must be >= 1, got {v}")
    check_writable(dest, "figure directory")
    from analysis.figures import build_figure_set
    from analysis.report import write_report

    t0 = time.time()
    fs = build_figure_set(dest, smoke=args.smoke, n_jobs=args.n_jobs, formats=tuple(args.formats),
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
    if not args.publish:
        print(f"exploratory output in {dest}/; `vrpo figures --publish` regenerates the published set in {PUBLISH_DIR}/")
    return 0


def register(sub) -> None:
    cores = available_cores()
    p = sub.add_parser("figures", help=HELP,
                       description="Runs (or reads from <out-dir>/cache) the figure sweeps, computes the population "
                       "theory and the theory-vs-simulation tables, draws F1-F7 (PNG and PDF) and writes "
                       "<out-dir>/REPORT.md, including every <out-dir>/sections/*.md fragment. Writes "
                       f"{EXPLORE_DIR}/ unless --publish, which writes the published set in {PUBLISH_DIR}/.")
    p.add_argument("--publish", action="store_true",
                   help=f"write the published figures and report into {PUBLISH_DIR}/ (tracked in git)")
    p.add_argument("--out-dir", default=None, help=f"figure directory without --publish (default: {EXPLORE_DIR})")
    p.add_argument("--smoke", action="store_true", help="tiny configuration (seconds; numbers not meaningful)")
    p.add_argument("--n-jobs", type=int, default=cores,
                   help=f"joblib workers for the sweeps (default: the available cores, {cores} here)")
    p.add_argument("--formats", nargs="+", default=["png", "pdf"], help="figure formats (default: png pdf)")
    p.add_argument("--only", nargs="+", metavar="FIG", help="only these figures (e.g. F1 F3); no report (default: all)")
    p.add_argument("--n-ctx", type=int, default=None, help="theory contexts (default: 20000; smoke 2000)")
    p.add_argument("--fresh", action="store_true", help="recompute every sweep, ignoring cached results")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_figures)
