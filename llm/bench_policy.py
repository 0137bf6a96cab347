"""Cost of VRPOTrainer against trl.DPOTrainer: step time and peak memory, same model and batch.

Variants, each in a fresh subprocess (so its peak memory is its own), all fp32 without
gradient checkpointing, reference log-probs precomputed unless said otherwise:

=================== ==================================================================
``trl-dpo``         ``trl.DPOTrainer``
``trl-dpo-refmodel`` ``trl.DPOTrainer`` with its default reference-model forward per step
``dpo-naive``       ``VRPOTrainer``, ``lam = 0``, one ``prompt + response`` row per response
``dpo-shared``      ``VRPOTrainer``, ``lam = 0``, prompt encoded once (the suite's fastest DPO)
``vrpo-naive``      ``VRPOTrainer``, ``lam = 1``, one extra pair, 4 rows per example
``vrpo-shared``     ``VRPOTrainer``, ``lam = 1``, one extra pair, prompt encoded once
=================== ==================================================================

The text is words of a word-level tokenizer (one word, one token), so every variant sees the
same token ids; prompt and response lengths are drawn once (seeded) with the HH ratio.
A step is the whole Trainer iteration (batch collation, forward, loss, backward, clipping,
AdamW, logging every 10 steps): the time between consecutive ``on_step_end`` callbacks.
Variants run in interleaved rounds; the headline is the minimum over all timed steps and
rounds (the usual estimator when other load only slows a step down), with the median of
per-round medians beside it. Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU
the peak RSS (sampled every millisecond) during the steps minus the RSS at the start of training.

``vrpo policy-bench`` prints the ratios side by side and writes them (with the settings) to
JSON. Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import threading
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


def _word_tokenizer(vocab: int):
    """Word-level tokenizer ``w0 .. w{vocab-2}`` plus ``<eos>`` (= pad): one word, one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<eos>": 0, **{f"w{i}": i + 1 for i in range(vocab - 1)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


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


class _Meter:
    """Step times (wall and process CPU) from ``on_step_end``, and the RSS peak sampled during training."""

    def __init__(self, device: str):
        from transformers import TrainerCallback

        meter = self

        class CB(TrainerCallback):
            def on_train_begin(self, *a, **k):
                meter.start()

            def on_step_end(self, *a, **k):
                meter.tick()

        self.callback, self.device = CB(), device
        self.times, self.cpu, self.last, self.peak, self.base = [], [], None, 0.0, 0.0
        self._stop = threading.Event()

    def _rss_mb(self) -> float:
        import psutil

        return psutil.Process().memory_info().rss / 2**20

    def start(self):
        import torch

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            self.base = self.peak = self._rss_mb()
            threading.Thread(target=self._sample, daemon=True).start()
        self.last = (time.perf_counter(), time.process_time())

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss_mb())
            time.sleep(0.001)

    def tick(self):
        now = (time.perf_counter(), time.process_time())
        self.times.append(now[0] - self.last[0])
        self.cpu.append(now[1] - self.last[1])
        self.last = now

    def peak_growth_mb(self) -> float:
        import torch

        self._stop.set()
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20 - self.base
        return self.peak - self.base


def run_variant(variant: str, s: dict) -> dict:
    """Train ``s['warmup'] + s['steps']`` steps of one variant; returns its measurements."""
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from .tiny_lm import load_causal_lm, tiny_gpt2
    from .vrpo_trainer import VRPOConfig, VRPOTrainer

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n_steps, B = s["warmup"] + s["steps"], s["batch_size"]
    if s.get("model"):
        model, tok = load_causal_lm(s["model"], dtype="float32", device=device)
        d = _data({**s, "vocab": tok.vocab_size}, n_steps * B)
        for c in ("prompt", "chosen", "rejected", "a_1", "a_2"):  # random ids as text for a real tokenizer
            d[c] = [tok.decode([int(w[1:]) for w in x.split()]) for x in d[c]]
    else:
        tok = _word_tokenizer(s["vocab"])
        model = tiny_gpt2(s["vocab"], n_layer=s["n_layer"], n_embd=s["n_embd"], n_head=4,
                          n_positions=s["prompt_tokens"] + s["response_tokens"] + 8, eos_token_id=0, seed=s["seed"])
        d = _data(s, n_steps * B)
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
    meter = _Meter(device)
    trainer.add_callback(meter.callback)
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
    rows = {v: {"device": runs[v][0]["device"], "threads": runs[v][0]["threads"],
                "step_s_min": min(t for x in runs[v] for t in x["step_s_all"]),
                "step_s_median": statistics.median(x["step_s_median"] for x in runs[v]),
                "step_cpu_s_median": statistics.median(x["step_cpu_s_median"] for x in runs[v]),
                "peak_mem_mb": statistics.median(x["peak_mem_mb"] for x in runs[v]), "rounds": runs[v]}
            for v in VARIANTS}
    ratios = {}
    for k, (a, b, tt, tm) in RATIOS.items():
        ratios[k] = {"step_time_min": rows[a]["step_s_min"] / rows[b]["step_s_min"],
                     "step_time_median": rows[a]["step_s_median"] / rows[b]["step_s_median"],
                     "step_cpu_time_median": rows[a]["step_cpu_s_median"] / rows[b]["step_cpu_s_median"],
                     "peak_mem": rows[a]["peak_mem_mb"] / max(rows[b]["peak_mem_mb"], 1e-9),
                     "target_time": tt, "target_mem": tm}
    print(f"\n{'variant':18s} {'min step ms':>12s} {'median step ms':>15s} {'peak MiB':>10s}")
    for v in VARIANTS:
        print(f"{v:18s} {rows[v]['step_s_min'] * 1e3:12.1f} {rows[v]['step_s_median'] * 1e3:15.1f} "
              f"{rows[v]['peak_mem_mb']:10.1f}")
    print(f"\n{'ratio (' + str(rounds) + ' rounds)':30s} {'time min':>9s} {'time med':>9s} {'cpu med':>9s} "
          f"{'peak mem':>9s}   targets (time, memory)")
    for k, r in ratios.items():
        print(f"{k:30s} {r['step_time_min']:9.2f} {r['step_time_median']:9.2f} {r['step_cpu_time_median']:9.2f} "
              f"{r['peak_mem']:9.2f}   {r['target_time']} {r['target_mem']}")
    print(f"load average (1, 5, 15 min) before/after: {load[0]} / {load[-1]}")
    result = {"settings": s, "variants": rows, "ratios": ratios, "cpu_count": os.cpu_count(), "load_avg": load}
    out = Path(s.get("out") or "results/policy_bench.json")
    write_json(out, result, indent=1)
    print(f"written {out}")
    return result


if __name__ == "__main__":  # one variant, in its own process
    print(json.dumps(run_variant(sys.argv[1], json.loads(sys.argv[2]))))
