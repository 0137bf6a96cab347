"""``vrpo policy-demo``: offline DPO vs VRPO on HH-RLHF with a small GPT-2 (llm.policy_demo).

Exploratory by default: results, figure and fragment under ``--results-dir``
(``results/policy_demo/``); ``--publish`` writes the figure and fragment into
``paper_figures/`` instead (tracked in git).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .configargs import ConfigFlags
from .errors import check_writable
from .publish import PUBLISH_DIR, add_publish_flag, exploratory_notice, output_dir, redraw_dir

HELP = "DPO vs VRPO on HH with a small GPT-2 trained offline: accuracy, judged win rates, gradient variance"

HELPS = {
    "data_path": "HH transcripts (jsonl.gz)",
    "cache_dir": "cache of the tokenizer, pi_ref and samples",
    "results_dir": "results directory (results.json, checkpoints; also the figure and fragment unless --publish)",
    "fig_dir": "figure / fragment directory",
    "seed": "master seed",
    "n_train": "HH pairs for DPO/VRPO training",
    "n_g": "pairs for fitting g (TF-IDF BT)",
    "n_judge": "pairs for fitting the judge (MiniLM BT)",
    "n_eval": "evaluation pairs",
    "vocab_size": "BPE vocabulary size",
    "n_layer": "GPT-2 layers",
    "n_embd": "GPT-2 width (a multiple of --n-head)",
    "n_head": "attention heads",
    "max_prompt_tokens": "prompt truncation (tokens)",
    "max_response_tokens": "response truncation (tokens)",
    "sft_steps": "SFT steps for pi_ref",
    "sft_batch_size": "SFT batch size",
    "sft_lr": "SFT learning rate",
    "temperature": "sampling temperature of a_1, a_2 ~ pi_ref",
    "max_new_tokens": "tokens sampled per response",
    "beta": "DPO beta",
    "lam": "VRPO lam: a number, or auto (power-tuned online)",
    "lr": "DPO/VRPO learning rate",
    "batch_size": "DPO/VRPO batch size",
    "grad_accum": "gradient accumulation steps",
    "steps": "DPO/VRPO optimiser steps",
    "warmup_steps": "learning-rate warm-up steps",
    "shared_prompt": "VRPO's shared-prompt forward pass",
    "precision": "fp32 or bf16",
    "checkpoint_every": "checkpoint interval (steps; resumable)",
    "probe_batch_size": "batch size of the gradient-variance probe",
    "probe_pairs": "batches in the gradient-variance probe",
    "n_gen_prompts": "prompts for judged generations (<= --n-eval)",
    "gen_samples": "generations per prompt",
    "smoke": "the seconds-long smoke configuration (tiny sizes)",
}


def flags() -> ConfigFlags:
    return ConfigFlags("llm.policy_demo:DemoConfig", helps=HELPS,
                       default_text={"data_path": "../shared/data/hh-rlhf/harmless-base-test.jsonl.gz beside the "
                                     "repository", "fig_dir": f"--results-dir; with --publish {PUBLISH_DIR}"})


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "policy-demo", help=HELP,
        description="Trains a BPE tokenizer and a small GPT-2 (pi_ref) on HH text, samples a_1, a_2 ~ pi_ref, fits g "
        "(TF-IDF BT) and a judge (MiniLM BT) on disjoint splits, trains DPO and VRPO from the same start and "
        "evaluates them; writes results/policy_demo/ (results.json, llm_policy_summary.png, sections/llm_policy.md); "
        f"--publish writes the figure and fragment into {PUBLISH_DIR}/ instead. Every DemoConfig field is a flag.")
    add_publish_flag(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--report-from", metavar="RESULTS_JSON",
                   help="only regenerate the figure and fragment from an existing results.json (into --fig-dir: the "
                   "results.json's directory, or with --publish paper_figures) (default: none)")
    flags().add_to(p)
    p.set_defaults(func=main)


def main(args) -> int:
    if args.report_from:
        dest = redraw_dir(args, args.report_from)
        from llm.policy_report import write_report

        with open(args.report_from, encoding="utf-8") as fh:
            results = json.load(fh)
        write_report(results, Path(dest))
        print(f"policy-demo: figure and sections/llm_policy.md written to {dest}")
        return 0
    from llm.policy_demo import smoke_config

    f = flags()
    given = {**f.from_file(args), **f.given(args)}
    cfg = f.build(args, factory=smoke_config if given.get("smoke") else None)
    cfg = dataclasses.replace(cfg, fig_dir=output_dir(args.publish, given.get("fig_dir"), cfg.results_dir, "--fig-dir"))
    if args.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        return 0
    for what, d in (("--results-dir", cfg.results_dir), ("figure directory", cfg.fig_dir),
                    ("--cache-dir", cfg.cache_dir)):
        check_writable(d, what)
    from llm.data import print_load_warnings
    from llm.policy_demo import run

    with print_load_warnings("vrpo policy-demo"):  # skipped/repaired data lines, one summary line per file
        run(cfg)
    exploratory_notice("policy-demo", args.publish)
    return 0
