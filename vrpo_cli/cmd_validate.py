"""``vrpo validate``: mutation tests and high-power theory checks; non-zero exit when the validation fails."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .configargs import available_cores
from .errors import UserError, check_writable

HELP = "mutation tests + high-power theory checks (exit 1 when the validation fails)"


def _validate(args) -> int:
    from analysis import validate as V

    if args.quick and args.default:
        raise UserError("--quick and --default exclude each other")
    if args.n_jobs == 0:
        raise UserError("--n-jobs must be >= 1 (or negative: joblib's all-but), got 0")
    mode = "default" if args.default else "quick"
    out = Path(args.out) if args.out else Path("results/validate") / f"{mode}.json"
    check_writable(out, "--out")
    if args.fragment:
        check_writable(args.fragment, "--fragment")
    if not args.no_cache:
        check_writable(args.cache_dir, "--cache-dir")
    result = V.run_validation(mode, seed=args.seed, n_jobs=args.n_jobs, cache_dir=None if args.no_cache else args.cache_dir,
                            progress=not (args.no_progress or args.json), fresh=args.fresh)
    V.write_result(result, out)
    if args.fragment:
        from vrpo_common.fileio import write_text

        write_text(args.fragment, V.render_markdown(result))
    code = V.exit_code(result)
    if args.json:
        from analysis.validate import strict_json

        json.dump(strict_json(result), sys.stdout, indent=1, allow_nan=False)
        sys.stdout.write("\n")
    else:
        print(V.format_table(result))
        print(f"results: {out}" + (f"\nfragment: {args.fragment}" if args.fragment else ""))
        print("VALIDATION PASSED" if code == 0 else "VALIDATION FAILED")
    return code


def register(sub) -> None:
    cores = available_cores()
    p = sub.add_parser("validate", help=HELP,
                       description="Simulates independent high-power cells, checks the asymptotic theory against "
                       "them (Holm-corrected, family-wise 1e-3) and runs the mutants of analysis.mutants (deliberately "
                       "wrong theories and sandwiches), each of which must be rejected. Prints a table (check, "
                       "simulated, predicted, effect, SE, z, Holm p-value, verdict). Exit code 1 when a correct "
                       "check is rejected after Holm, a mutant survives, or the self-g identity fails.")
    p.add_argument("--quick", action="store_true", help="the CI configuration (the default mode when neither is given)")
    p.add_argument("--default", action="store_true", help="the full validation (more instances, scenarios, n ladders; minutes)")
    p.add_argument("--json", action="store_true", help="print the machine-readable result on stdout instead of the table")
    p.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    p.add_argument("--n-jobs", type=int, default=cores,
                   help=f"joblib workers; results do not depend on it (default: the available cores, {cores} here)")
    p.add_argument("--out", help="result JSON (default: results/validate/<mode>.json)")
    p.add_argument("--fragment", help="also write the report fragment (markdown) here, e.g. "
                   "paper_figures/sections/validation.md (default: none)")
    p.add_argument("--cache-dir", default="results/validate/cache", help="per-cell and theory cache (default: results/validate/cache)")
    p.add_argument("--no-cache", action="store_true", help="no cache: compute everything in memory")
    p.add_argument("--fresh", action="store_true", help="ignore cached cells")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_validate)
