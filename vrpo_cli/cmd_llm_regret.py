"""``vrpo llm-regret``: DPO vs VRPO regret curves on a small LM under a known gold preference (llm.lm_regret)."""

from __future__ import annotations

import json

from .configargs import ConfigFlags
from .errors import check_writable

HELP = "gold win rates of DPO, cDPO, rDPO and VRPO on a small LM under a known, BT-misspecified gold preference"

HELPS = {
    "data_dir": "directory holding relabeled-hh-rlhf/",
    "cache_dir": "cache of pi_ref, samples and features (reused across runs)",
    "out_dir": "results directory (results.parquet, cells.csv, run.json, figures, llm_regret.md)",
    "publish_dir": "where --publish copies the figures and the section",
    "n_eval_prompts": "evaluation prompts",
    "split_seed": "seed of the prompt split",
    "pi_ref": "reference policy: tiny (a GPT-2 trained here by SFT) or hf:<name>",
    "features": "gold features: minilm-static or minilm",
    "ns": "labelled pairs per training",
    "seeds": "seeds per cell (>= 2)",
    "first_seed": "first seed",
    "kappas": "gold mixture strengths in [0, 1] (0: BT in the helpful head)",
    "Ms": "unlabelled pairs per prompt for VRPO",
    "gs": "auxiliary models for the full lam x M grid: oracle, one-type, noisy, learned, self, constant",
    "extra_gs": "auxiliary models run at lam = 1, largest M only",
    "lams": "VRPO variants: 1, auto",
    "baselines": "baselines: dpo (required), cdpo, rdpo",
    "beta": "DPO beta",
    "lr": "learning rate",
    "batch_size": "batch size (<= the smallest n)",
    "epochs": "epochs over the labelled pairs",
    "device": "auto, cpu or cuda",
    "workers": "parallel training processes (0: chosen from the cores)",
    "torch_threads": "torch threads per worker",
}


def flags() -> ConfigFlags:
    return ConfigFlags("llm.lm_regret:LMRegretConfig", helps=HELPS, skip=("smoke", "preset", "publish"),
                       default_text={"data_dir": "../shared/data beside the repository"})


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "llm-regret", help=HELP,
        description="Fits a gold preference over text (helpful and harmless heads on the GPT-3.5-relabeled HH "
        "pairs, mixed per prompt with strength kappa), trains pi_ref, samples pairs from it, labels them with "
        "Z ~ Bernoulli(p*), trains every method with VRPOTrainer over seeds and n, and evaluates gold win rates, "
        "KL, accuracy and gradient variance exactly under p*. Writes results/llm_regret/ (tidy results.parquet, "
        "cells.csv, run.json, figures, llm_regret.md); --publish also copies the figures to paper_figures/ and the "
        "section to paper_figures/sections/llm_regret.md. Resumable: finished tasks and cached stages are reused. "
        "Every LMRegretConfig field is a flag; list flags take spaces or commas (--ns 250 1000 --kappas 0,1).",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny sizes for tests (a few minutes on 2 cores)")
    size.add_argument("--full", action="store_true",
                      help="the full grid: n in {250,500,1000,2000}, kappa in {0,0.5,1}, all six g (docs/llm_regret.md)")
    p.add_argument("--publish", dest="publish_flag", action="store_true",
                   help="copy the figures and the section into --publish-dir (default: paper_figures/)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--feature-check", action="store_true",
                   help="measure the gold features' adequacy: CV accuracy on the GPT-3.5 labels of heads on MiniLM-static "
                        "vs full MiniLM features and their cost (minutes on CPU); writes <out-dir>/feature_check.json")
    p.add_argument("--feature-check-pairs", type=int, default=1000,
                   help="pairs per objective for --feature-check (default: 1000)")
    p.add_argument("--report-only", action="store_true",
                   help="regenerate figures and section from a finished run with the same settings (no training)")
    flags().add_to(p)
    p.set_defaults(func=main)


def build_config(args):
    from llm.lm_regret import full_config, smoke_config

    factory = smoke_config if args.smoke else full_config if args.full else None
    return flags().build(args, factory=factory, extra={"publish": True} if args.publish_flag else None)


def main(args) -> int:
    cfg = build_config(args)
    if args.print_config:
        print(json.dumps(cfg.resolved(), indent=1))
        return 0
    check_writable(cfg.out_dir, "--out-dir")
    check_writable(cfg.cache_dir, "--cache-dir")
    if cfg.publish:
        check_writable(cfg.publish_dir, "--publish-dir")
    if args.feature_check:
        import os
        from pathlib import Path

        from llm.gold import feature_adequacy
        from vrpo_common.fileio import write_json

        load = os.getloadavg()[0]
        res = feature_adequacy(cfg.data_dir, max_pairs=args.feature_check_pairs, cache_dir=Path(cfg.cache_dir) /
                               "embeddings", progress=cfg.progress)
        res["load_avg_1min_at_start"] = load
        path = write_json(Path(cfg.out_dir) / "feature_check.json", res, indent=1)
        print(f"wrote {path}")
        return 0
    if args.report_only:
        from llm.lm_regret_report import regenerate

        for path in regenerate(cfg):
            print(path)
        return 0
    from llm.lm_regret import run

    run(cfg)
    return 0
