"""``vrpo bench``: performance benchmarks printed as ratios (see :mod:`sim.bench`)."""

from __future__ import annotations

import json


def _run(args) -> int:
    from sim.bench import main

    res = main(which=tuple(args.which), ppi_reps=args.ppi_reps, memory_reps=args.memory_reps)
    if args.json:
        print(json.dumps(res, indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: batched fit_bt vs ppi_py, scaling in n and R, sweep peak memory")
    p.add_argument("--which", nargs="+", default=["fit", "scaling"], choices=["fit", "scaling", "memory"],
                   help="which benchmarks (memory runs a 10,000-replication sweep: several minutes)")
    p.add_argument("--ppi-reps", type=int, default=None, help="replications in the ppi_py loop (default: all 200)")
    p.add_argument("--memory-reps", type=int, default=10_000)
    p.add_argument("--json", action="store_true", help="also print the numbers as JSON")
    p.set_defaults(func=_run)
