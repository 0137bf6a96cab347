"""``vrpo policy-demo``: offline DPO vs VRPO on HH-RLHF with a small GPT-2 (llm.policy_demo),
and ``vrpo policy-bench``: step time and peak memory of VRPOTrainer vs trl.DPOTrainer (llm.bench_policy)."""

from __future__ import annotations

import dataclasses
import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "policy-demo",
        help="DPO vs VRPO on HH with a small GPT-2 trained offline: accuracy, judged win rates, gradient variance",
        description="Trains a BPE tokenizer and a small GPT-2 (pi_ref) on HH text, samples a_1, a_2 ~ pi_ref, fits g "
        "(TF-IDF BT) and a judge (MiniLM BT) on disjoint splits, trains DPO and VRPO from the same start and "
        "evaluates them; writes results/policy_demo/results.json, paper_figures/llm_policy_summary.png and "
        "paper_figures/sections/llm_policy.md. Every DemoConfig field is a flag (--n-train 1000 ...).",
    )
    from llm.policy_demo import DemoConfig

    for f in dataclasses.fields(DemoConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), metavar="{true,false}")
        else:
            typ = {"int": int, "float": float, "str": str}.get(str(f.type), str)
            p.add_argument(flag, type=typ)
    p.add_argument("--config", help="JSON file of DemoConfig fields; flags override it")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--report-from", metavar="RESULTS_JSON",
                   help="only regenerate the figure and fragment from an existing results.json")
    p.set_defaults(func=main, smoke_flag=None)

    b = subparsers.add_parser(
        "policy-bench",
        help="step time and peak memory of VRPOTrainer (DPO and VRPO, naive and shared-prompt) vs trl.DPOTrainer",
        description="Same model and batch for every variant; each variant runs in a fresh subprocess so its peak "
        "memory is its own; variants interleaved over rounds. Model: a random GPT-2 of the demo's shape.",
    )
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--prompt-tokens", type=int, default=192)
    b.add_argument("--response-tokens", type=int, default=64)
    b.add_argument("--steps", type=int, default=12)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--n-layer", type=int, default=4)
    b.add_argument("--n-embd", type=int, default=128)
    b.add_argument("--vocab", type=int, default=2048)
    b.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    b.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all variants (min and median)")
    b.add_argument("--out", default="results/policy_bench.json")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=bench_main)


def main(args) -> int:
    from llm.policy_demo import DemoConfig, run

    if args.report_from:
        from pathlib import Path

        from llm.policy_report import write_report

        with open(args.report_from, encoding="utf-8") as fh:
            results = json.load(fh)
        write_report(results, Path(args.fig_dir or results["config"]["fig_dir"]))
        return 0
    over = {}
    if args.config:
        with open(args.config, encoding="utf-8") as fh:
            over.update(json.load(fh))
    for f in dataclasses.fields(DemoConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            over[f.name] = v
    if over.get("smoke"):
        from llm.policy_demo import smoke_config

        cfg = smoke_config(**{k: v for k, v in over.items() if k != "smoke"})
    else:
        cfg = DemoConfig(**over)
    if args.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        return 0
    run(cfg)
    return 0


def bench_main(args) -> int:
    from llm.bench_policy import run_benchmark

    run_benchmark(vars(args))
    return 0
