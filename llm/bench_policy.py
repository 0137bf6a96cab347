"""Cost of VRPO vs DPO, measured: step time and peak memory, same model and batch.

Four variants, each in a fresh subprocess (so a variant's peak memory is its own):
``dpo-naive`` (2 rows per example), ``dpo-shared`` (prompt once + 2 continuations),
``vrpo-naive`` (4 rows), ``vrpo-shared`` (prompt once + 4 continuations). A step is
forward, :func:`llm.vrpo_loss.vrpo_objective`, backward and an AdamW update. Prompt and
response lengths are drawn once (seeded) with the HH ratio (prompts ~3x responses) and
shared by all variants. Variants run in interleaved rounds; the headline step time is the
minimum over all timed steps and rounds (the usual estimator when other load can only slow
a step down), with the median of per-round medians of wall-clock and process CPU time
alongside. Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the
growth of the process's peak RSS over its level before the first step.

``vrpo policy-bench`` prints the ratios side by side and writes them (with the settings)
to JSON. Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vrpo_common.fileio import atomic_path

__all__ = ["VARIANTS", "run_variant", "run_benchmark"]

VARIANTS = ("dpo-naive", "dpo-shared", "vrpo-naive", "vrpo-shared")


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_variant(variant: str, s: dict) -> dict:
    """Time ``s['steps']`` optimisation steps of one variant (after ``s['warmup']``); returns measurements."""
    import numpy as np
    import torch

    from .tiny_lm import load_causal_lm, tiny_gpt2
    from .vrpo_loss import collate, sequence_logps, vrpo_objective

    method, path = variant.split("-")
    torch.manual_seed(s["seed"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if s.get("model"):
        model, tok = load_causal_lm(s["model"], dtype="bfloat16" if s["precision"] == "bf16" else "float32",
                                    device=device)
        vocab, pad = len(tok), tok.pad_token_id
    else:
        vocab, pad = s["vocab"], 0
        model = tiny_gpt2(vocab, n_layer=s["n_layer"], n_embd=s["n_embd"], n_head=4,
                          n_positions=s["prompt_tokens"] + s["response_tokens"] + 8, seed=s["seed"]).to(device)
    model.train()
    rng = np.random.default_rng(s["seed"])
    B, K = s["batch_size"], (2 if method == "dpo" else 4)

    def make_batch():
        prompts = [rng.integers(1, vocab, rng.integers(s["prompt_tokens"] // 2, s["prompt_tokens"] + 1)).tolist()
                   for _ in range(B)]
        resp = [[rng.integers(1, vocab, rng.integers(s["response_tokens"] // 2, s["response_tokens"] + 1)).tolist()
                 for _ in range(4)] for _ in range(B)]
        return collate(prompts, [r[:K] for r in resp])

    batches = [make_batch() for _ in range(s["warmup"] + s["steps"])]  # same for every variant (same seed)
    gen = torch.Generator().manual_seed(s["seed"])
    ref = -50 + torch.randn(B, 4, generator=gen)
    g, g_aux = torch.rand(B, generator=gen), torch.rand(B, generator=gen)
    lam = 0.0 if method == "dpo" else 1.0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=s["precision"] == "bf16")

    def step(batch):
        with autocast:
            logps = sequence_logps(model, batch, pad, shared_prompt=(path == "shared")).float()
        loss = vrpo_objective(logps, ref[:, :K].to(logps.device), 0.1, lam, g=g.to(logps.device),
                              g_aux=g_aux.to(logps.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _maxrss_mb()
    losses, times, cpu_times = [], [], []
    for i, b in enumerate(batches):
        if device == "cuda":
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        losses.append(step(b))
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= s["warmup"]:
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
    peak = (torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else _maxrss_mb()
    return {"variant": variant, "device": device, "step_s_median": statistics.median(times),
            "step_s_all": times, "step_cpu_s_median": statistics.median(cpu_times), "peak_mem_mb": peak - base, "first_loss": losses[0],
            "tokens_per_step": sum(len(p) + sum(len(r) for r in rs) for p, rs in
                                   zip(batches[0].prompts, batches[0].responses)),
            "threads": torch.get_num_threads()}


def run_benchmark(settings: dict) -> dict:
    """Run all variants in subprocesses, print a table of ratios, write ``settings['out']``."""
    s = {k: v for k, v in settings.items() if k not in ("func",)}
    rounds = int(s.get("rounds") or 3)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(rounds):  # interleaved rounds: slow drifts of machine load hit every variant alike
        for v in VARIANTS:
            cmd = [sys.executable, "-m", "llm.bench_policy", v, json.dumps(s)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            if out.returncode != 0:
                raise RuntimeError(f"benchmark variant {v} failed:\n{out.stderr[-3000:]}")
            runs[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
            x = runs[v][-1]
            print(f"round {r + 1}/{rounds} {v:12s} step {x['step_s_median'] * 1e3:8.1f} ms "
                  f"(cpu {x['step_cpu_s_median'] * 1e3:8.1f} ms)  peak +{x['peak_mem_mb']:8.1f} MiB  "
                  f"first loss {x['first_loss']:.6f}", flush=True)
    rows = {v: {**runs[v][0],
                "step_s_median": statistics.median(x["step_s_median"] for x in runs[v]),
                "step_cpu_s_median": statistics.median(x["step_cpu_s_median"] for x in runs[v]),
                "peak_mem_mb": statistics.median(x["peak_mem_mb"] for x in runs[v]),
                "step_s_min": min(t for x in runs[v] for t in x["step_s_all"]),
                "rounds": runs[v]} for v in VARIANTS}
    t = {v: rows[v]["step_s_min"] for v in VARIANTS}
    tm = {v: rows[v]["step_s_median"] for v in VARIANTS}
    c = {v: rows[v]["step_cpu_s_median"] for v in VARIANTS}
    m = {v: max(rows[v]["peak_mem_mb"], 1e-9) for v in VARIANTS}
    pairs = {"vrpo_naive_over_dpo_naive": ("vrpo-naive", "dpo-naive"),
             "vrpo_shared_over_dpo_naive": ("vrpo-shared", "dpo-naive"),
             "vrpo_shared_over_dpo_shared": ("vrpo-shared", "dpo-shared"),
             "dpo_shared_over_dpo_naive": ("dpo-shared", "dpo-naive")}
    ratios = {k: (t[a] / t[b], tm[a] / tm[b], c[a] / c[b], m[a] / m[b]) for k, (a, b) in pairs.items()}
    print(f"\n{'variant':14s} {'min step ms':>12s} {'median step ms':>15s} {'peak MiB':>10s}")
    for v in VARIANTS:
        print(f"{v:14s} {t[v] * 1e3:12.1f} {tm[v] * 1e3:15.1f} {m[v]:10.1f}")
    print(f"\n{'ratio (' + str(rounds) + ' rounds)':30s} {'time (min)':>10s} {'time (med)':>10s} {'cpu (med)':>10s} "
          f"{'peak mem':>10s}   target (time)")
    targets = {"vrpo_naive_over_dpo_naive": "<= 1.6", "vrpo_shared_over_dpo_naive": "<= 1.1"}
    for k, (rt, rtm, rc, rm) in ratios.items():
        print(f"{k:30s} {rt:10.2f} {rtm:10.2f} {rc:10.2f} {rm:10.2f}   {targets.get(k, '')}")
    same = abs(rows["vrpo-naive"]["first_loss"] - rows["vrpo-shared"]["first_loss"])
    same_d = abs(rows["dpo-naive"]["first_loss"] - rows["dpo-shared"]["first_loss"])
    print(f"\nfirst-step loss |naive - shared|: VRPO {same:.2e}, DPO {same_d:.2e}")
    result = {"settings": s, "variants": rows,
              "ratios": {k: {"step_time_min": a, "step_time_median": b, "step_cpu_time_median": cc, "peak_mem": mm}
                         for k, (a, b, cc, mm) in ratios.items()},
              "cpu_count": os.cpu_count(), "load_avg_after": os.getloadavg()}
    out = Path(s.get("out") or "results/policy_bench.json")
    with atomic_path(out) as tmp, open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    print(f"written {out}")
    return result


if __name__ == "__main__":  # one variant, in its own process
    print(json.dumps(run_variant(sys.argv[1], json.loads(sys.argv[2]))))
