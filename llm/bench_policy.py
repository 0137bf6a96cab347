"""Cost of VRPOTrainer against trl.DPOTrainer: step time and peak memory, same model and batch.

Variants (each in a fresh subprocess, so its peak memory is its own; fp32, no gradient
checkpointing, reference log-probs precomputed): ``trl-dpo`` (``trl.DPOTrainer``; ``-refmodel``:
its default reference forward per step), ``dpo-naive`` / ``dpo-shared`` (VRPOTrainer, ``lam = 0``;
one row per response / the prompt encoded once), ``vrpo-naive`` / ``vrpo-shared`` (``lam = 1``, one
extra pair). A word-level tokenizer gives every variant the same token ids (lengths drawn once,
prompts ~3x responses as in HH). A step is a whole Trainer iteration (collation, forward, loss,
backward, clipping, AdamW, logging every 10 steps) between ``on_step_end`` callbacks. Variants run
in interleaved rounds; the headline is the minimum over steps and rounds (load only slows a step
down), with the median of the rounds' medians and the median process CPU time.
Peak memory: max allocated on GPU; on CPU the growth of the process's peak RSS from the start
of training (the reference precompute before it needs far less). ``vrpo policy-bench`` prints the ratios and writes them to JSON.
Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import resource
import sys
import time
from pathlib import Path

from vrpo_common.fileio import write_json

__all__ = ["VARIANTS", "RATIOS", "run_variant", "run_benchmark"]

VARIANTS = ("trl-dpo", "trl-dpo-refmodel", "dpo-naive", "dpo-shared", "vrpo-naive", "vrpo-shared")
# ratio name -> (numerator, denominator, target on time, target on memory)
RATIOS = {
    "vrpo_shared_over_trl_dpo": ("vrpo-shared", "trl-dpo", "<= 1.1", "<= 1.2"),
    "vrpo_shared_over_dpo_shared": ("vrpo-shared", "dpo-shared", "", ""),
    "vrpo_naive_over_dpo_naive": ("vrpo-naive", "dpo-naive", "", ""),
    "dpo_shared_over_trl_dpo": ("dpo-shared", "trl-dpo", "", ""),
    "dpo_naive_over_trl_dpo": ("dpo-naive", "trl-dpo", "", ""),
    "trl_dpo_refmodel_over_trl_dpo": ("trl-dpo-refmodel", "trl-dpo", "", ""),
}


def _data(s: dict, n: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(s["seed"])
    text = lambda lo, hi: " ".join(f"w{w}" for w in rng.integers(0, s["vocab"] - 1, rng.integers(lo, hi + 1)))  # noqa: E731
    P, R = s["prompt_tokens"], s["response_tokens"]
    d = {"prompt": [text(P // 2, P) for _ in range(n)]}
    for c in ("chosen", "rejected", "a_1", "a_2"):  # the tokenizer's EOS is appended: <= R tokens each
        d[c] = [" " + text(R // 2 - 1, R - 1) for _ in range(n)]
    d["g"], d["g_aux"] = rng.uniform(0, 1, n).tolist(), rng.uniform(0, 1, n).tolist()
    return d


def _meter(device: str):
    """A callback recording step times (wall, process CPU) at ``on_step_end`` and the peak memory growth."""
    import torch
    from transformers import TrainerCallback

    peak = (lambda: torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else \
        (lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # noqa: E731  Linux: KiB

    class Meter(TrainerCallback):
        times, cpu = [], []

        def on_train_begin(self, *a, **k):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            self.base, self.last = peak(), (time.perf_counter(), time.process_time())

        def on_step_end(self, *a, **k):
            now = (time.perf_counter(), time.process_time())
            self.times.append(now[0] - self.last[0])
            self.cpu.append(now[1] - self.last[1])
            self.last = now

        def peak_growth_mb(self) -> float:
            return peak() - self.base

    return Meter()


def run_variant(variant: str, s: dict) -> dict:
    """Train ``s['warmup'] + s['steps']`` steps of one variant; returns its measurements."""
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from .tiny_lm import tiny_gpt2, word_tokenizer
    from .vrpo_trainer import VRPOConfig, VRPOTrainer

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n_steps, B = s["warmup"] + s["steps"], s["batch_size"]
    tok, d = word_tokenizer(s["vocab"]), _data(s, n_steps * B)
    model = tiny_gpt2(s["vocab"], n_layer=s["n_layer"], n_embd=s["n_embd"], n_head=4,
                      n_positions=s["prompt_tokens"] + s["response_tokens"] + 8, eos_token_id=0, seed=s["seed"])
    common = dict(output_dir=os.path.join(s.get("tmp") or "/tmp", f"policy-bench-{variant}"), report_to=[],
                  per_device_train_batch_size=B, max_steps=n_steps, learning_rate=1e-5, save_strategy="no",
                  disable_tqdm=True, gradient_checkpointing=False, bf16=s["precision"] == "bf16",
                  use_cpu=device == "cpu", seed=s["seed"], max_length=None,
                  precompute_ref_log_probs=variant != "trl-dpo-refmodel")
    if variant.startswith("trl-"):
        ds = Dataset.from_dict({c: d[c] for c in ("prompt", "chosen", "rejected")})
        ref = None if common["precompute_ref_log_probs"] else copy.deepcopy(model)
        trainer = DPOTrainer(model, ref_model=ref, args=DPOConfig(**common), train_dataset=ds, processing_class=tok)
    else:
        method, path = variant.split("-")
        args = VRPOConfig(lam=0.0 if method == "dpo" else 1.0, shared_prompt=path == "shared", **common)
        trainer = VRPOTrainer(model, args=args, train_dataset=Dataset.from_dict(d), processing_class=tok)
    trainer.remove_callback(PrinterCallback)
    meter = _meter(device)
    trainer.add_callback(meter)
    trainer.train()
    peak = meter.peak_growth_mb()
    times, cpu = meter.times[s["warmup"]:], meter.cpu[s["warmup"]:]
    return {"variant": variant, "device": device, "step_s_all": times, "step_s_median": statistics.median(times),
            "step_cpu_s_median": statistics.median(cpu), "peak_mem_mb": peak, "threads": torch.get_num_threads()}


def run_benchmark(settings: dict) -> dict:
    """Run every variant in subprocesses, interleaved over rounds; print the ratios; write ``settings['out']``."""
    s = {k: v for k, v in settings.items() if k != "func"}
    rounds = int(s.get("rounds") or 3)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    load = [os.getloadavg()]
    for r in range(rounds):  # interleaved: slow drifts of machine load hit every variant alike
        for v in VARIANTS:
            out = subprocess.run([sys.executable, "-m", "llm.bench_policy", v, json.dumps(s)], capture_output=True,
                                 text=True, cwd=Path(__file__).resolve().parents[1])
            if out.returncode != 0:
                raise RuntimeError(f"benchmark variant {v} failed:\n{out.stderr[-3000:]}")
            x = json.loads(out.stdout.strip().splitlines()[-1])
            runs[v].append(x)
            print(f"round {r + 1}/{rounds} {v:17s} step min {min(x['step_s_all']) * 1e3:7.1f} ms, median "
                  f"{x['step_s_median'] * 1e3:7.1f} ms (cpu {x['step_cpu_s_median'] * 1e3:7.1f} ms)  peak "
                  f"+{x['peak_mem_mb']:7.1f} MiB", flush=True)
        load.append(os.getloadavg())
    med = lambda v, key: statistics.median(x[key] for x in runs[v])  # noqa: E731
    rows = {v: {"device": runs[v][0]["device"], "threads": runs[v][0]["threads"], "rounds": runs[v],
                "step_s_min": min(t for x in runs[v] for t in x["step_s_all"]), "step_s_median": med(v, "step_s_median"),
                "step_cpu_s_median": med(v, "step_cpu_s_median"), "peak_mem_mb": med(v, "peak_mem_mb")}
            for v in VARIANTS}
    ratio = lambda a, b, key: rows[a][key] / max(rows[b][key], 1e-9)  # noqa: E731
    ratios = {k: {"step_time_min": ratio(a, b, "step_s_min"), "step_time_median": ratio(a, b, "step_s_median"),
                  "step_cpu_time_median": ratio(a, b, "step_cpu_s_median"), "peak_mem": ratio(a, b, "peak_mem_mb"),
                  "target_time": tt, "target_mem": tm} for k, (a, b, tt, tm) in RATIOS.items()}
    result = {"settings": s, "variants": rows, "ratios": ratios, "cpu_count": os.cpu_count(), "load_avg": load}
    from .policy_report import cost_section

    print("\n" + cost_section(result))
    out = write_json(Path(s.get("out") or "results/policy_bench.json"), result, indent=1)
    print(f"written {out}")
    return result


if __name__ == "__main__":  # one variant, in its own process
    print(json.dumps(run_variant(sys.argv[1], json.loads(sys.argv[2]))))
