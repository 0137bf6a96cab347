"""``vrpo hh-reward``: the variance-reduced BT reward model on real HH-RLHF labels (llm.hh_reward)."""

from __future__ import annotations

import argparse
import json
import sys


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _strs(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "hh-reward",
        help="VR reward model on HH-RLHF human labels with a GPT-3.5 annotator as g (real data)",
        description="Labelled subsets of HH-RLHF relabeled pairs, GPT-3.5 / learned / constant g, MLE vs VR vs "
        "VR-auto; writes results/hh_reward/, paper_figures/hh_reward_*.png and paper_figures/sections/hh_reward.md.",
    )
    p.add_argument("--data-dir", help="directory holding relabeled-hh-rlhf/ (default: ../shared/data beside the repo)")
    p.add_argument("--config", help="JSON (or YAML) file of HHRewardConfig fields; flags override it")
    p.add_argument("--ns", type=_ints, help="labelled sizes, e.g. 100,200,400,800,1600")
    p.add_argument("--reps", type=int, help="random subsamples per n (default 200)")
    p.add_argument("--n-aux", type=int, help="auxiliary pairs per subsample (default 2000)")
    p.add_argument("--d", type=int, help="principal directions of the margin features (default 16)")
    p.add_argument("--objectives", type=_strs, help="GPT-3.5 objectives: helpful,harmless")
    p.add_argument("--subsets", type=_strs, help="HH subsets: helpful,harmless")
    p.add_argument("--aux-models", type=_strs, help="llm,learned,constant")
    p.add_argument("--max-pairs", type=int, help="use only the first N pairs of each cell (smoke runs)")
    p.add_argument("--seed", type=int)
    p.add_argument("--on-error", choices=["raise", "skip"], help="malformed data lines: raise or skip (default skip)")
    p.add_argument("--cache-dir", help="embedding cache directory (default .cache/embeddings)")
    p.add_argument("--out-dir", help="results directory (default results/hh_reward)")
    p.add_argument("--fig-dir", help="figure / fragment directory (default paper_figures)")
    p.add_argument("--smoke", action="store_true", help="the seconds-long smoke configuration")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--from-results", metavar="RESULTS_JSON",
                   help="only redraw the figure and fragment from a saved results.json (into --fig-dir)")
    p.set_defaults(func=main)


def _load_config_file(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def main(args) -> int:
    from llm.hh_reward import HHRewardConfig, regenerate, run, smoke_config

    if args.from_results:
        out = regenerate(args.from_results, args.fig_dir or "paper_figures")
        print(f"hh-reward: redrew {', '.join(map(str, out['figures']))} and {out['fragment']}")
        return 0

    fields = _load_config_file(args.config) if args.config else {}
    flags = dict(data_dir=args.data_dir, ns=args.ns, reps=args.reps, n_aux=args.n_aux, d=args.d,
                 objectives=args.objectives, subsets=args.subsets, aux_models=args.aux_models,
                 max_pairs=args.max_pairs, seed=args.seed, on_error=args.on_error, cache_dir=args.cache_dir,
                 out_dir=args.out_dir, fig_dir=args.fig_dir)
    fields.update({k: v for k, v in flags.items() if v is not None})
    if args.no_progress:
        fields["progress"] = False
    try:
        cfg = smoke_config(**fields) if args.smoke else HHRewardConfig(**fields)
    except (TypeError, ValueError) as e:
        print(f"vrpo hh-reward: bad configuration: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.resolved(), indent=1))
        return 0
    from llm.data import print_load_warnings

    try:
        with print_load_warnings("vrpo hh-reward"):  # skipped/repaired data lines, one summary line per file
            result = run(cfg)
    except FileNotFoundError as e:
        print(f"vrpo hh-reward: {e}", file=sys.stderr)
        return 2
    print(f"hh-reward: {len(result['rows'])} result rows in {result['timing']['total_s']:.0f} s "
          f"(load + embed {result['timing']['load_and_embed_s']:.0f} s); wrote {cfg.out_dir}/results.json, "
          f"{cfg.fig_dir}/hh_reward_variance_accuracy.png and {cfg.fig_dir}/sections/hh_reward.md")
    return 0
