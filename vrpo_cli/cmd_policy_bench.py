"""``vrpo policy-bench``: step time and peak memory of VRPOTrainer vs trl.DPOTrainer (llm.bench_policy)."""

from __future__ import annotations

HELP = "step time and peak memory of VRPOTrainer (DPO and VRPO, naive and shared-prompt) vs trl.DPOTrainer"


def register(subparsers) -> None:
    b = subparsers.add_parser(
        "policy-bench", help=HELP,
        description="Same model and batch for every variant; each variant runs in a fresh subprocess so its peak "
        "memory is its own; variants interleaved over rounds. Model: a random GPT-2 of the demo's shape.")
    b.add_argument("--batch-size", type=int, default=8, help="pairs per step (default: 8)")
    b.add_argument("--prompt-tokens", type=int, default=192, help="prompt length in tokens (default: 192)")
    b.add_argument("--response-tokens", type=int, default=64, help="response length in tokens (default: 64)")
    b.add_argument("--steps", type=int, default=12, help="timed steps per variant and round (default: 12)")
    b.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default: 3)")
    b.add_argument("--n-layer", type=int, default=4, help="GPT-2 layers (default: 4)")
    b.add_argument("--n-embd", type=int, default=128, help="GPT-2 width (default: 128)")
    b.add_argument("--vocab", type=int, default=2048, help="vocabulary size (default: 2048)")
    b.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="precision (default: fp32)")
    b.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all variants (min and median) "
                   "(default: 3)")
    b.add_argument("--out", default="results/policy_bench.json", help="result JSON (default: results/policy_bench.json)")
    b.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    b.set_defaults(func=main)


def main(args) -> int:
    from .errors import UserError, check_writable

    for name in ("batch_size", "prompt_tokens", "response_tokens", "steps", "n_layer", "n_embd", "vocab", "rounds"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    check_writable(args.out, "--out")
    from llm.bench_policy import run_benchmark

    run_benchmark(vars(args))
    return 0
