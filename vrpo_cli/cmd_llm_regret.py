"""``vrpo llm-regret``: DPO vs VRPO regret curves on a small LM under a known gold preference (llm.lm_regret)."""

from __future__ import annotations

import dataclasses
import json

TUPLE_TYPES = {"ns": int, "kappas": float, "Ms": int, "gs": str, "lams": str, "baselines": str}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "llm-regret",
        help="gold win rates of DPO, cDPO, rDPO and VRPO on a small LM under a known, BT-misspecified gold "
             "preference",
        description="Fits a gold preference over text (helpful and harmless heads on the GPT-3.5-relabeled HH "
        "pairs, mixed per prompt with strength kappa), trains pi_ref, samples pairs from it, labels them with "
        "Z ~ Bernoulli(p*), trains every method with VRPOTrainer over seeds and n, and evaluates gold win rates, "
        "KL, accuracy and gradient variance exactly under p*. Writes results/llm_regret/ (tidy results.parquet, "
        "cells.csv, run.json, figures, llm_regret.md); --publish also copies the figures to paper_figures/ and the "
        "section to paper_figures/sections/llm_regret.md. Resumable: finished tasks and cached stages are reused. "
        "Every LMRegretConfig field is a flag (--ns 250 1000 --kappas 0 1 ...).",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny sizes for tests (a few minutes on 2 cores)")
    size.add_argument("--full", action="store_true",
                      help="the full grid: n in {250,500,1000,2000}, kappa in {0,0.5,1}, all six g (docs/llm_regret.md)")
    from llm.lm_regret import LMRegretConfig

    for f in dataclasses.fields(LMRegretConfig):
        if f.name in ("smoke", "preset", "publish"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name in TUPLE_TYPES:
            p.add_argument(flag, nargs="+", type=TUPLE_TYPES[f.name])
        elif f.type in ("bool", bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), metavar="{true,false}")
        else:
            typ = {"int": int, "float": float, "str": str}.get(str(f.type), str)
            p.add_argument(flag, type=typ)
    p.add_argument("--publish", dest="publish_flag", action="store_true",
                   help="copy the figures and the section into --publish-dir (default paper_figures/)")
    p.add_argument("--config", help="JSON file of LMRegretConfig fields; flags override it")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--feature-check", action="store_true",
                   help="measure the gold features' adequacy: CV accuracy on the GPT-3.5 labels of heads on MiniLM-static "
                        "vs full MiniLM features and their cost (minutes on CPU); writes <out-dir>/feature_check.json")
    p.add_argument("--feature-check-pairs", type=int, default=1000, help="pairs per objective for --feature-check")
    p.add_argument("--report-only", action="store_true",
                   help="regenerate figures and section from a finished run with the same settings (no training)")
    p.set_defaults(func=main)


def build_config(args):
    from llm.lm_regret import LMRegretConfig, full_config, smoke_config

    over = {}
    if args.config:
        with open(args.config, encoding="utf-8") as fh:
            over.update(json.load(fh))
    for f in dataclasses.fields(LMRegretConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            over[f.name] = v
    if args.publish_flag:
        over["publish"] = True
    if args.smoke:
        return smoke_config(**over)
    if args.full:
        return full_config(**over)
    return LMRegretConfig(**over)


def main(args) -> int:
    cfg = build_config(args)
    if args.print_config:
        print(json.dumps(cfg.resolved(), indent=1))
        return 0
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
