"""Offline DPO vs VRPO demo on HH-RLHF with a small GPT-2 trained from scratch (``vrpo policy-demo``).

Tokenizer and ``pi_ref`` are trained on HH text (``trl.SFTTrainer``; no pretrained weights are
reachable here). Disjoint seeded splits: ``train`` (SFT text, DPO/VRPO pairs, prompts for
``a_1, a_2 ~ pi_ref``), ``g`` (BT on TF-IDF response features), ``judge`` (BT on MiniLM embeddings),
``eval`` (held-out accuracy, prompts for judged generations). DPO and VRPO are two
:class:`llm.vrpo_trainer.VRPOTrainer` runs from the same ``pi_ref``, seed, data order and budget;
the gradient-variance probe compares both objectives at fixed parameters. Caches (``pi_ref`` as
safetensors, samples, embeddings) in ``cfg.cache_dir``, TRL checkpoints in ``cfg.results_dir``
(reruns resume or reuse them); results, figure and fragment are generated from the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Literal
from pathlib import Path

import numpy as np

from vrpo_common.fileio import atomic_path, write_json

__all__ = ["DemoConfig", "smoke_config", "run", "default_data_path"]


def default_data_path() -> Path:
    """``../shared/data/hh-rlhf/harmless-base-test.jsonl.gz`` beside the repository."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


@dataclass
class DemoConfig:
    """Every setting of the demo; validated on construction, written into every result and checkpoint."""

    data_path: str = ""
    cache_dir: str = ".cache/policy_demo"
    results_dir: str = "results/policy_demo"
    fig_dir: str = "paper_figures"
    seed: int = 0
    # splits of the HH pairs (sizes; the rest is unused)
    n_train: int = 1000
    n_g: int = 500
    n_judge: int = 500
    n_eval: int = 300
    # tokenizer and model
    vocab_size: int = 2048
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    max_prompt_tokens: int = 128
    max_response_tokens: int = 48
    # SFT -> pi_ref
    sft_steps: int = 300
    sft_batch_size: int = 16
    sft_lr: float = 2e-3
    # a_1, a_2 ~ pi_ref
    temperature: float = 1.0
    max_new_tokens: int = 48
    # DPO / VRPO
    beta: float = 0.1
    lam: float | str = 1.0  # or "auto" (power-tuned online)
    lr: float = 3e-4
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 100
    warmup_steps: int = 10
    shared_prompt: bool = True
    precision: Literal["fp32", "bf16"] = "fp32"
    checkpoint_every: int = 50
    # evaluation
    probe_batch_size: int = 16
    probe_pairs: int = 16
    n_gen_prompts: int = 150
    gen_samples: int = 2
    progress: bool = True
    smoke: bool = False

    def __post_init__(self):
        self.lam = self.lam if self.lam == "auto" else float(self.lam)  # "0.5" from the command line
        if not self.data_path:
            self.data_path = str(default_data_path())
        small = [f for f, v in asdict(self).items() if type(v) is int and f not in ("seed", "warmup_steps") and v < 1]
        checks = {f"{small} must be >= 1": not small,
                  f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})": self.n_embd % self.n_head == 0,
                  "batch sizes must not exceed n_train": max(self.probe_batch_size, self.batch_size) <= self.n_train,
                  f"n_gen_prompts ({self.n_gen_prompts}) must be <= n_eval ({self.n_eval})":
                      self.n_gen_prompts <= self.n_eval,
                  "beta, temperature, lr and sft_lr must be > 0": min(self.beta, self.temperature, self.lr, self.sft_lr) > 0,
                  "lam = 0 would make VRPO identical to the DPO baseline; use lam != 0": self.lam != 0}
        for msg, ok in checks.items():
            if not ok:
                raise ValueError(msg)

    def part_hash(self, *fields: str) -> str:
        d = asdict(self)
        return hashlib.sha256(json.dumps({f: d[f] for f in fields}, sort_keys=True).encode()).hexdigest()[:12]


def smoke_config(**over) -> DemoConfig:
    """Seconds-scale settings for the test suite (same pipeline, tiny sizes)."""
    base = dict(n_train=48, n_g=40, n_judge=40, n_eval=24, vocab_size=400, n_layer=2, n_embd=32, n_head=2,
                max_prompt_tokens=48, max_response_tokens=16, sft_steps=20, sft_batch_size=8, max_new_tokens=12,
                batch_size=8, steps=6, warmup_steps=2, checkpoint_every=3, probe_batch_size=8, probe_pairs=4,
                n_gen_prompts=12, gen_samples=1, lr=1e-3, smoke=True, progress=False)
    base.update(over)
    return DemoConfig(**base)


def _splits(n_total: int, cfg: DemoConfig) -> dict[str, np.ndarray]:
    sizes = {"train": cfg.n_train, "g": cfg.n_g, "judge": cfg.n_judge, "eval": cfg.n_eval}
    if sum(sizes.values()) > n_total:
        raise ValueError(f"splits need {sum(sizes.values())} pairs, the data has {n_total}")
    ends = np.cumsum(list(sizes.values()))
    perm = np.random.default_rng(cfg.seed).permutation(n_total)
    return {k: np.sort(perm[e - n : e]) for (k, n), e in zip(sizes.items(), ends)}


def _log(msg: str, t0: float) -> None:
    print(f"[policy-demo {time.time() - t0:6.0f}s] {msg}", flush=True)


def _train(lam: float, pi_ref_state: dict, make_model, tok, cfg: DemoConfig, out_dir: Path, train_ds, eval_ds,
           g_model):
    """One VRPOTrainer run from ``pi_ref`` (``lam = 0``: DPO, which also prepares the held-out pairs);
    resumes from (or reuses) its checkpoints."""
    import torch
    from transformers import PrinterCallback
    from transformers.trainer_utils import get_last_checkpoint

    from .vrpo_trainer import VRPOConfig, VRPOTrainer

    policy = make_model()
    policy.load_state_dict(pi_ref_state)
    args = VRPOConfig(
        output_dir=str(out_dir), lam=lam, beta=cfg.beta, g_source="model" if lam else "columns",
        learning_rate=cfg.lr, per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        max_steps=cfg.steps, lr_scheduler_type="constant_with_warmup", warmup_steps=cfg.warmup_steps,
        weight_decay=0.0, max_grad_norm=1.0, shared_prompt=cfg.shared_prompt, bf16=cfg.precision == "bf16",
        use_cpu=not torch.cuda.is_available(), seed=cfg.seed, precompute_ref_log_probs=True,
        max_prompt_length=cfg.max_prompt_tokens, max_completion_length=cfg.max_response_tokens, max_length=None,
        save_strategy="steps", save_steps=cfg.checkpoint_every, logging_steps=1, report_to=[],
        disable_tqdm=not cfg.progress)
    trainer = VRPOTrainer(policy, args=args, train_dataset=train_ds, eval_dataset=None if lam else eval_ds,
                          processing_class=tok, g_model=g_model if lam else None)
    if not cfg.progress:
        trainer.remove_callback(PrinterCallback)  # no per-step log lines
    trainer.train(resume_from_checkpoint=get_last_checkpoint(str(out_dir)))
    policy.eval()
    hist = [{"step": h["step"], "loss": h["loss"], "margin": h["rewards/margins"], "acc": h["rewards/accuracies"],
             "grad_norm": h["grad_norm"]} for h in trainer.state.log_history if "loss" in h]
    return trainer, policy, hist


def run(cfg: DemoConfig) -> dict:
    """Run the whole demo; returns (and writes) the results dict."""
    import torch
    from safetensors.torch import load_model, save_model

    from .aux_responses import SamplingConfig, aux_responses, sample_responses
    from .data import load_hh
    from .judge import LinearPreferenceModel, MiniLMFeatures, TfidfFeatures
    from .evaluate import gradient_variance_probe, implicit_reward_accuracy
    from .evaluate import judge_win_rate as win_rate
    from .tiny_lm import encode_pair_texts, sft, tiny_gpt2, train_bpe_tokenizer

    t0, c0 = time.time(), time.process_time()
    torch.manual_seed(cfg.seed)
    cache, res = Path(cfg.cache_dir), Path(cfg.results_dir)
    resolved = asdict(cfg)
    timings = {}

    # ---------------------------------------------------------------- data
    df = load_hh(cfg.data_path, on_error="skip")
    report = df.attrs.get("load_report")
    split = _splits(len(df), cfg)
    part = {k: df.iloc[v].reset_index(drop=True) for k, v in split.items()}
    _log(f"{len(df)} HH pairs ({report.n_skipped if report else 0} skipped lines); splits "
         + ", ".join(f"{k}={len(v)}" for k, v in part.items()), t0)
    sp = lambda xs: [" " + x for x in xs]  # noqa: E731  (prompt + " " + response is the transcript)

    # ---------------------------------------------------------------- tokenizer + pi_ref
    t = time.time()
    tr = part["train"]
    tok = train_bpe_tokenizer((tr.prompt + " " + tr.chosen).tolist(), vocab_size=cfg.vocab_size)
    n_pos = cfg.max_prompt_tokens + max(cfg.max_response_tokens, cfg.max_new_tokens) + 8
    make_model = lambda: tiny_gpt2(len(tok), cfg.n_layer, cfg.n_embd, cfg.n_head, n_positions=n_pos,  # noqa: E731
                                   eos_token_id=tok.eos_token_id, seed=cfg.seed)
    model = make_model()
    key = cfg.part_hash("data_path", "seed", "n_train", "n_g", "n_judge", "n_eval", "vocab_size", "n_layer", "n_embd",
                        "n_head", "max_prompt_tokens", "max_response_tokens", "max_new_tokens", "sft_steps",
                        "sft_batch_size", "sft_lr")
    sft_path, sft_meta = cache / f"pi_ref-{key}.safetensors", cache / f"pi_ref-{key}.json"
    if sft_path.exists() and sft_meta.exists():
        load_model(model, str(sft_path))
        meta = json.loads(sft_meta.read_text())
        sft_losses = meta["losses"]
        timings.update(sft_cached_from_earlier_run=True, sft_train_wall_s=meta["train_wall_s"])
    else:
        p_ids, r_ids = encode_pair_texts(tok, tr.prompt.tolist(), [[r] for r in sp(tr.chosen)],
                                         cfg.max_prompt_tokens, cfg.max_response_tokens)
        sft_losses = sft(model, tok, [p + r[0] for p, r in zip(p_ids, r_ids)], cfg.sft_steps, cfg.sft_batch_size,
                         cfg.sft_lr, cfg.seed, progress=cfg.progress)
        sft_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(sft_path) as tmp:
            save_model(model, str(tmp))
        write_json(sft_meta, {"losses": sft_losses, "config": resolved, "train_wall_s": time.time() - t})
    model.eval()
    timings["sft_s"] = time.time() - t
    _log(f"pi_ref ready (SFT loss {sft_losses[0]:.2f} -> {np.mean(sft_losses[-20:]):.2f})", t0)

    # ---------------------------------------------------------------- a_1, a_2 ~ pi_ref
    t = time.time()
    samp = SamplingConfig(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                          max_prompt_tokens=cfg.max_prompt_tokens, batch_size=64, seed=cfg.seed)
    a_1, a_2 = aux_responses(model, tok, tr.prompt.tolist(), samp, cache / "aux", progress=cfg.progress)
    tr = tr.assign(a_1=a_1, a_2=a_2)
    timings["aux_s"] = time.time() - t
    _log(f"aux responses ready ({np.mean([len(a) for a in a_1]):.0f} chars on average)", t0)

    # ---------------------------------------------------------------- g (TF-IDF BT) and judge (MiniLM BT)
    t = time.time()
    gp, jp, ev = part["g"], part["judge"], part["eval"]
    g_model = LinearPreferenceModel(TfidfFeatures(), seed=cfg.seed).fit(gp.prompt, gp.chosen, gp.rejected)
    emb_cache = cache / "embeddings"
    judge = LinearPreferenceModel(MiniLMFeatures(cache_dir=emb_cache, progress=cfg.progress), seed=cfg.seed)
    judge.fit(jp.prompt, jp.chosen, jp.rejected)
    quality = {
        "g_features": g_model.features.name, "g_C": g_model.C, "g_cv_acc": g_model.cv_accuracy,
        "g_eval_acc": g_model.accuracy(ev.prompt, ev.chosen, ev.rejected),
        "judge_features": judge.features.name, "judge_C": judge.C, "judge_cv_acc": judge.cv_accuracy,
        "judge_eval_acc": judge.accuracy(ev.prompt, ev.chosen, ev.rejected),
    }
    g_eval = g_model(ev.prompt, ev.chosen, ev.rejected)
    j_eval = judge(ev.prompt, ev.chosen, ev.rejected)
    quality["g_judge_agreement"] = float(np.mean((g_eval > 0.5) == (j_eval > 0.5)))
    timings["g_judge_s"] = time.time() - t
    _log("g: acc {g_eval_acc:.3f} on eval (cv {g_cv_acc:.3f}); judge: acc {judge_eval_acc:.3f} (cv {judge_cv_acc:.3f})"
         .format(**quality), t0)

    # ---------------------------------------------------------------- DPO and VRPO from the same start (VRPOTrainer)
    # g reads responses without the leading space of the transcript convention
    strip = lambda xs: [x[1:] for x in xs]  # noqa: E731
    g_text = lambda p, a, b: g_model(p, strip(a), strip(b))  # noqa: E731
    cols = ["prompt", "chosen", "rejected"]
    train_ds = {"prompt": tr.prompt.tolist(), "chosen": sp(tr.chosen), "rejected": sp(tr.rejected),
                "a_1": sp(tr.a_1), "a_2": sp(tr.a_2)}
    eval_ds = {c: (sp(ev[c]) if c != "prompt" else ev[c].tolist()) for c in cols}
    # checkpoints of this exact configuration (a rerun with the same settings resumes or reuses them)
    run_key = cfg.part_hash(*[f for f in resolved if f not in ("progress", "fig_dir", "results_dir", "cache_dir")])
    pi_ref_state = {k: v.clone() for k, v in model.state_dict().items()}
    trainers, policies, train_hist = {}, {}, {}
    for method, lam in (("dpo", 0.0), ("vrpo", cfg.lam)):
        t = time.time()
        trainers[method], policies[method], train_hist[method] = _train(
            lam, pi_ref_state, make_model, tok, cfg, res / f"{method}-{run_key}", train_ds, eval_ds, g_text)
        timings[f"train_{method}_s"] = time.time() - t
        _log(f"{method}: {cfg.steps} steps, last loss {train_hist[method][-1]['loss']:.4f}", t0)
    vr = trainers["vrpo"]
    g_col, ga_col = np.asarray(vr.train_dataset["g"][:]), np.asarray(vr.train_dataset["g_aux"][:])
    g_stats = {"g_mean": float(g_col.mean()), "g_aux_mean": float(ga_col.mean()), "g_sd": float(g_col.std()),
               "g_aux_sd": float(ga_col.std()), "g_train_acc": float(np.mean(g_col > 0.5))}

    # ---------------------------------------------------------------- gradient-variance probe
    t = time.time()
    probe_kw = dict(lam=vr._lam, batch_size=cfg.probe_batch_size, n_pairs=cfg.probe_pairs, progress=cfg.progress)
    probe = {"pi_ref": gradient_variance_probe(model, vr, seed=cfg.seed, desc="grad variance @ pi_ref", **probe_kw)}
    for i, m in enumerate(("dpo", "vrpo")):  # at each trained policy (each is the other's off-optimum point)
        probe[f"{m}_trained"] = gradient_variance_probe(policies[m], vr, seed=cfg.seed + 1 + i,
                                                        desc=f"grad variance @ {m.upper()}", **probe_kw)
    timings["probe_s"] = time.time() - t
    for k, p in probe.items():
        _log(f"gradient variance @ {k}: VRPO/DPO = {p['ratio']:.3f} [{p['ratio_lo']:.3f}, {p['ratio_hi']:.3f}]", t0)

    # ---------------------------------------------------------------- held-out implicit-reward accuracy
    t = time.time()
    acc = {m: implicit_reward_accuracy(trainers["dpo"], p) for m, p in policies.items()}
    diff = acc["vrpo"]["correct"] - acc["dpo"]["correct"]
    from vrpo_common.stats import mean_ci

    acc_diff = mean_ci(diff)
    for m in acc:
        acc[m].pop("correct")

    # ---------------------------------------------------------------- judged generations
    gen_prompts = ev.prompt.tolist()[: cfg.n_gen_prompts]
    gen_cfg = dataclasses.replace(samp, seed=cfg.seed + 7)
    gens = {}
    for name, pol in (("pi_ref", model), ("dpo", policies["dpo"]), ("vrpo", policies["vrpo"])):
        gens[name] = sample_responses(pol, tok, gen_prompts, cfg.gen_samples, gen_cfg, progress=cfg.progress,
                                      desc=f"generate {name}")
    rewards = {}
    for name, g in gens.items():
        flat_p = [p for p in gen_prompts for _ in range(cfg.gen_samples)]
        flat_r = [r for rs in g for r in rs]
        rewards[name] = judge.reward(flat_p, flat_r).reshape(len(gen_prompts), cfg.gen_samples)
    wins = {
        "vrpo_vs_dpo": win_rate(rewards["vrpo"], rewards["dpo"]),
        "vrpo_vs_pi_ref": win_rate(rewards["vrpo"], rewards["pi_ref"]),
        "dpo_vs_pi_ref": win_rate(rewards["dpo"], rewards["pi_ref"]),
    }
    gen_len = {k: float(np.mean([len(r) for rs in v for r in rs])) for k, v in gens.items()}
    timings["eval_s"] = time.time() - t
    timings["total_s"] = time.time() - t0
    timings["total_cpu_s"] = time.process_time() - c0  # all threads of this process
    timings["load_avg_1_5_15"] = list(os.getloadavg())
    _log("accuracy DPO {:.3f}, VRPO {:.3f}; win VRPO>DPO {:.3f} [{:.3f}, {:.3f}]".format(
        acc["dpo"]["mean"], acc["vrpo"]["mean"], wins["vrpo_vs_dpo"]["mean"], wins["vrpo_vs_dpo"]["lo"],
        wins["vrpo_vs_dpo"]["hi"]), t0)

    results = {
        "config": resolved,
        "data": {"n_pairs": len(df), "skipped_lines": report.n_skipped if report else None,
                 "splits": {k: len(v) for k, v in part.items()}},
        "model": {"params": int(sum(p.numel() for p in model.parameters())), "vocab": len(tok),
                  "sft_first_loss": sft_losses[0], "sft_last_loss": float(np.mean(sft_losses[-20:]))},
        "g_and_judge": {**quality, **g_stats},
        "implicit_reward_accuracy": {**acc, "vrpo_minus_dpo": acc_diff},
        "win_rates": wins,
        "gen_mean_chars": gen_len,
        "gradient_variance": probe,
        "train_history": train_hist,
        "examples": [{"prompt": gen_prompts[i][-300:], **{k: gens[k][i][0] for k in gens}} for i in range(3)],
        "timings_s": timings,
    }
    res.mkdir(parents=True, exist_ok=True)
    write_json(res / "results.json", results, indent=1)
    from .policy_report import write_report

    write_report(results, Path(cfg.fig_dir))
    _log(f"done in {timings['total_s']:.0f}s; results in {res / 'results.json'}", t0)
    return results
