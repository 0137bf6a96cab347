"""``vrpo bench``: performance benchmarks printed as ratios (see :mod:`sim.bench`)."""

from __future__ import annotations

import json
import sys

from .errors import UserError, check_writable

WHICH = ["fit", "first-fit", "scaling", "kernel", "memory"]
HELP = "benchmarks: fit_bt vs warmed ppi_py and a plain NumPy Newton, start-up, scaling, memory"


def _run(args) -> int:
    if args.readme and not args.markdown:
        raise UserError("--readme needs --markdown (the generated file the README embeds)")
    for name in ("reps", "ppi_reps", "rounds", "memory_reps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads < 0:
        raise UserError(f"--threads must be >= 0, got {args.threads}")
    for path in (args.markdown, args.readme):
        if path:
            check_writable(path, "output")
    from sim.bench import main

    command = "vrpo " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "vrpo bench"
    res = main(which=tuple(args.which), ppi_reps=args.ppi_reps, rounds=args.rounds, memory_reps=args.memory_reps,
               R=args.reps, markdown=args.markdown, command=command, threads=None if args.threads == 0 else args.threads,
               readme=args.readme)
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help=HELP,
        description="Benchmarks measured side by side in one process (interleaved rounds; min and median), every "
        "competitor warmed before it is timed and its start-up reported on its own line. Never timed asserts.")
    p.add_argument("--which", nargs="+", default=["fit", "first-fit", "scaling"], choices=WHICH,
                   help="which benchmarks (memory runs a 10,000-replication sweep: several minutes) (default: fit first-fit scaling)")
    p.add_argument("--reps", type=int, default=200, help="replications R in the fit benchmark (default 200)")
    p.add_argument("--ppi-reps", type=int, default=20, help="replications in each round's ppi_py loop (default 20)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    p.add_argument("--memory-reps", type=int, default=10_000, help="replications of the memory sweep (default: 10000)")
    p.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads for every competitor (default 1; "
                   "0: the libraries' defaults)")
    p.add_argument("--markdown", metavar="PATH", help="write the generated performance table (markdown) to PATH, "
                   "e.g. docs/performance.md, which the README embeds (default: none)")
    p.add_argument("--readme", metavar="PATH", help="with --markdown: also replace the generated block of PATH "
                   "(README.md) with the table (default: none)")
    p.add_argument("--json", action="store_true", help="also print the numbers as JSON")
    p.set_defaults(func=_run)
