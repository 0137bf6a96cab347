"""``vrpo hh-reward``: the variance-reduced BT reward model on real HH-RLHF labels (llm.hh_reward).

Exploratory by default: results, figure and report fragment under ``--out-dir``
(``results/hh_reward/``); ``--publish`` writes the figure and fragment into
``paper_figures/`` instead (tracked in git).
"""

from __future__ import annotations

import dataclasses
import json

from .configargs import ConfigFlags
from .errors import check_writable
from .publish import PUBLISH_DIR, add_publish_flag, exploratory_notice, output_dir, redraw_dir

HELP = "VR reward model on HH-RLHF human labels with a GPT-3.5 annotator as g (real data)"

HELPS = {
    "data_dir": "directory holding relabeled-hh-rlhf/",
    "objectives": "GPT-3.5 objectives: helpful, harmless",
    "subsets": "HH subsets: helpful, harmless",
    "ns": "labelled sizes, increasing",
    "reps": "random subsamples per n (>= 20)",
    "n_aux": "auxiliary pairs per subsample",
    "heldout_frac": "fraction of each cell held out for accuracy",
    "d": "principal directions of the margin features",
    "aux_models": "auxiliary models g: llm (GPT-3.5 label), learned, constant",
    "k_folds": "cross-fitting folds of the learned g",
    "learned_ridge": "ridge penalty of the learned g",
    "max_pairs": "use only the first N pairs of each cell (smoke runs)",
    "bias_n": "labelled size of the finite-sample bias study",
    "bias_N": "auxiliary sizes of the bias study",
    "bias_reps": "replications of the bias study",
    "seed": "master seed",
    "on_error": "malformed data lines: raise or skip (skips are summarised on the console)",
    "cache_dir": "embedding cache directory",
    "out_dir": "results directory (results.json; also the figure and fragment unless --publish)",
    "fig_dir": "figure / fragment directory",
}


def flags() -> ConfigFlags:
    return ConfigFlags("llm.hh_reward:HHRewardConfig", helps=HELPS,
                       default_text={"data_dir": "../shared/data beside the repository",
                                     "cache_dir": ".cache/embeddings", "fig_dir": "--out-dir; with --publish "
                                     + PUBLISH_DIR})


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "hh-reward", help=HELP,
        description="Labelled subsets of HH-RLHF relabeled pairs, GPT-3.5 / learned / constant g, MLE vs VR vs "
        "VR-auto; writes results/hh_reward/ (results.json, hh_reward_*.png, sections/hh_reward.md); --publish "
        f"writes the figure and fragment into {PUBLISH_DIR}/ instead. List flags take spaces or commas.")
    p.add_argument("--smoke", action="store_true", help="the seconds-long smoke configuration (other defaults)")
    add_publish_flag(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--from-results", metavar="RESULTS_JSON",
                   help="only redraw the figure and fragment from a saved results.json (into --fig-dir: the "
                   "results.json's directory, or with --publish paper_figures) (default: none)")
    flags().add_to(p)
    p.set_defaults(func=main)


def main(args) -> int:
    if args.from_results:
        dest = redraw_dir(args, args.from_results)
        from llm.hh_reward import regenerate

        out = regenerate(args.from_results, dest)
        print(f"hh-reward: redrew {', '.join(map(str, out['figures']))} and {out['fragment']}")
        return 0
    from llm.hh_reward import smoke_config

    f = flags()
    given_fig = f.given(args).get("fig_dir") or f.from_file(args).get("fig_dir")
    cfg = f.build(args, factory=smoke_config if args.smoke else None)
    cfg = dataclasses.replace(cfg, fig_dir=output_dir(args.publish, given_fig, cfg.out_dir, "--fig-dir"))
    if args.print_config:
        print(json.dumps(cfg.resolved(), indent=1))
        return 0
    check_writable(cfg.out_dir, "--out-dir")
    check_writable(cfg.fig_dir, "figure directory")
    from llm.data import print_load_warnings
    from llm.hh_reward import run

    with print_load_warnings("vrpo hh-reward"):  # skipped/repaired data lines, one summary line per file
        result = run(cfg)
    print(f"hh-reward: {len(result['rows'])} result rows in {result['timing']['total_s']:.0f} s "
          f"(load + embed {result['timing']['load_and_embed_s']:.0f} s); wrote {cfg.out_dir}/results.json, "
          f"{cfg.fig_dir}/hh_reward_variance_accuracy.png and {cfg.fig_dir}/sections/hh_reward.md")
    exploratory_notice("hh-reward", args.publish)
    return 0
