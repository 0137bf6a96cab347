"""Regret curves on a language model: DPO vs VRPO under a known, BT-misspecified gold preference.

The LLM analogue of the bandit sweep (docs/llm_regret.md). Stages, each cached or resumable:

=========  ===========================================================================
stage      what it does (cache key)
=========  ===========================================================================
prompts    unique HH prompts of the relabeled files, split by prompt into a training
           pool and held-out evaluation prompts (``split_seed``)
pi_ref     byte-level BPE tokenizer + a small GPT-2 trained by SFT on the pool's
           transcripts (or any ``transformers`` causal LM: ``pi_ref="hf:<name or path>"``)
gold       heads on the GPT-3.5 helpful / harmless labels (:mod:`llm.gold`), scaled on
           ``pi_ref`` pairs so ``sd(r_k(y1) - r_k(y2)) = target_sd``
ref_bank   ``ref_samples`` responses of ``pi_ref`` per evaluation prompt (win rates vs
           ``pi_ref``, held-out pairs for the implicit-reward accuracy), plus an independent
           ``pi_ref`` sample for the ``pi_ref`` vs ``pi_ref`` check
seed_data  per seed: ``max(ns)`` labelled prompts drawn with replacement from the pool,
           ``2 + 2 max(Ms)`` responses each from ``pi_ref``, their reference log-probs,
           gold head rewards, learned-g features, the uniforms behind the labels
probe_ref  gradient-variance probe at ``pi_ref`` with its closed form
train      one task per (kappa, n, method[, g, M], seed): the labelled set is the seed's
           first ``n`` prompts, ``Z ~ Bernoulli(p*)``, trained with ``VRPOTrainer``, then
           evaluated on the held-out prompts; one result file per task (resumable)
aggregate  tidy table (one row per cell and seed, resolved config embedded), win rates
           against the same-seed DPO policy, then figures and the report section
=========  ===========================================================================

A seed redraws the labelled prompts, the responses, the labels and the training order;
``pi_ref``, the gold and the evaluation prompts are fixed. Methods that do not use ``g``
(DPO, cDPO, rDPO) are trained once per (kappa, n, seed). Every random draw comes from a
generator keyed by the seed and the stage, each task runs with a fixed number of torch
threads, so results do not depend on the number of workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from vrpo_common.fileio import atomic_path, json_default, write_json
from vrpo_common.stats import mean_se

__all__ = [
    "LMRegretConfig",
    "smoke_config",
    "full_config",
    "PI_REF_PRESETS",
    "G_KINDS",
    "BASELINES",
    "Task",
    "tasks",
    "run",
    "default_data_dir",
]

#: small GPT-2 shapes trained offline by SFT; ``hf:<name or path>`` loads any causal LM instead
PI_REF_PRESETS = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, vocab_size=1024),
    "small": dict(n_layer=4, n_embd=128, n_head=4, vocab_size=2048),
    "base": dict(n_layer=6, n_embd=256, n_head=8, vocab_size=4096),
}
G_KINDS = ("oracle", "one-type", "noisy", "learned", "self", "constant")
BASELINES = ("dpo", "cdpo", "rdpo")
LAMS = ("1", "auto")


def default_data_dir() -> str:
    """``../shared/data`` beside the repository."""
    return str(Path(__file__).resolve().parents[1].parent / "shared" / "data")


def _crc(s: str) -> int:
    return zlib.crc32(s.encode())


def _rng(*key) -> np.random.Generator:
    """A generator keyed by ints and strings (strings through crc32)."""
    return np.random.default_rng(np.random.SeedSequence([_crc(k) if isinstance(k, str) else int(k) for k in key]))


def _seed_int(*key) -> int:
    return int(_rng(*key).integers(0, 2**31 - 1))


@dataclass(frozen=True)
class LMRegretConfig:
    """Every setting of ``vrpo llm-regret``; validated on construction, written into every result.

    Sweep: ``ns`` labelled pairs, ``seeds`` seeds from ``first_seed``, gold strengths ``kappas``
    (0: BT in the helpful head; 1: full mixture), VRPO variants ``lams x gs x Ms``, baselines
    ``baselines`` (DPO, cDPO with soft label ``1 - eps_cdpo``, rDPO with flip rate ``eps_rdpo``).
    ``gs``: ``oracle`` (p*), ``one-type`` (head ``one_type_head`` alone: a biased judge), ``noisy``
    (``logit p* + N(0, noisy_sd^2)``), ``learned`` (cross-fitted BT on ``learned_dim`` principal
    directions of the features), ``self`` (the lagged frozen policy), ``constant`` (1/2).
    """

    data_dir: str = field(default_factory=default_data_dir)
    cache_dir: str = ".cache/llm_regret"
    out_dir: str = "results/llm_regret"
    publish_dir: str = "paper_figures"
    publish: bool = False
    # prompts
    n_eval_prompts: int = 160
    split_seed: int = 0
    # pi_ref
    pi_ref: str = "tiny"
    max_prompt_tokens: int = 32
    max_new_tokens: int = 16
    sft_steps: int = 800
    sft_batch_size: int = 32
    sft_lr: float = 3e-3
    # gold
    features: Literal["minilm-static", "minilm"] = "minilm-static"
    length_features: bool = True
    target_sd: float = 3.0
    weight: Literal["constant", "prompt"] = "constant"
    w_max: float = 0.5
    n_scale_prompts: int = 400
    one_type_head: Literal["helpful", "harmless"] = "harmless"
    noisy_sd: float = 1.0
    learned_folds: int = 5
    learned_dim: int = 16
    learned_ridge: float = 1e-2
    # sweep
    ns: tuple = (250, 1000)
    seeds: int = 5
    first_seed: int = 0
    kappas: tuple = (0.0, 1.0)
    Ms: tuple = (1, 4)
    gs: tuple = ("oracle", "one-type")
    extra_gs: tuple = ()
    lams: tuple = LAMS
    baselines: tuple = BASELINES
    eps_cdpo: float = 0.1
    eps_rdpo: float = 0.1
    # training (same for every method: one budget)
    beta: float = 0.1
    lr: float = 1e-3
    batch_size: int = 32
    epochs: float = 2.0
    warmup_ratio: float = 0.1
    self_g_refresh: int = 10
    # evaluation
    ref_samples: int = 4
    eval_samples: int = 2
    probe_batch_size: int = 16
    probe_pairs: int = 32
    probe_pairs_trained: int = 16
    closed_form_prompts: int = 128
    probe_trained: bool = True
    # machinery
    device: str = "auto"
    workers: int = 0
    torch_threads: int = 1
    sample_batch_size: int = 256
    max_pairs_gold: int = 0
    progress: bool = True
    smoke: bool = False
    preset: str = "default"

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"LMRegretConfig: {msg}")

        for name in ("ns", "kappas", "Ms", "gs", "extra_gs", "lams", "baselines"):
            v = getattr(self, name)
            v = (v,) if isinstance(v, (str, int, float)) else tuple(v)
            object.__setattr__(self, name, v)
        object.__setattr__(self, "ns", tuple(int(n) for n in self.ns))
        object.__setattr__(self, "Ms", tuple(int(m) for m in self.Ms))
        object.__setattr__(self, "kappas", tuple(float(k) for k in self.kappas))
        object.__setattr__(self, "lams", tuple(str(x) for x in self.lams))
        if not self.ns or list(self.ns) != sorted(set(self.ns)) or self.ns[0] < self.batch_size:
            bad(f"ns must be increasing distinct sizes >= batch_size ({self.batch_size}); got {self.ns}")
        if not self.kappas or any(not 0.0 <= k <= 1.0 for k in self.kappas) or len(set(self.kappas)) != len(self.kappas):
            bad(f"kappas must be distinct values in [0, 1]; got {self.kappas}")
        if not self.Ms or any(m < 1 for m in self.Ms) or len(set(self.Ms)) != len(self.Ms):
            bad(f"Ms must be distinct integers >= 1; got {self.Ms}")
        if any(g not in G_KINDS for g in self.gs) or len(set(self.gs)) != len(self.gs):
            bad(f"gs must be distinct values from {G_KINDS}; got {self.gs}")
        if any(g not in G_KINDS for g in self.extra_gs) or set(self.extra_gs) & set(self.gs) or \
                len(set(self.extra_gs)) != len(self.extra_gs):
            bad(f"extra_gs must be distinct values from {G_KINDS} not in gs; got {self.extra_gs}")
        if any(x not in LAMS for x in self.lams):
            bad(f"lams must be values from {LAMS}; got {self.lams}")
        if any(b not in BASELINES for b in self.baselines) or "dpo" not in self.baselines:
            bad(f"baselines must include 'dpo' (the reference of every comparison) and come from {BASELINES}; "
                f"got {self.baselines}")
        if self.seeds < 2:
            bad(f"seeds must be >= 2 (intervals over seeds); got {self.seeds}")
        if not (self.pi_ref in PI_REF_PRESETS or self.pi_ref.startswith("hf:")):
            bad(f"pi_ref must be one of {sorted(PI_REF_PRESETS)} or 'hf:<name or path>'; got {self.pi_ref!r}")
        from .gold import FEATURE_KINDS, WEIGHT_MODES

        if self.features not in FEATURE_KINDS:
            bad(f"features must be one of {FEATURE_KINDS}; got {self.features!r}")
        if self.weight not in WEIGHT_MODES:
            bad(f"weight must be one of {WEIGHT_MODES}; got {self.weight!r}")
        if self.one_type_head not in ("helpful", "harmless"):
            bad(f"one_type_head must be 'helpful' or 'harmless'; got {self.one_type_head!r}")
        for name in ("n_eval_prompts", "max_prompt_tokens", "max_new_tokens", "sft_steps", "sft_batch_size",
                     "n_scale_prompts", "learned_folds", "learned_dim", "batch_size", "ref_samples", "eval_samples",
                     "probe_batch_size", "probe_pairs", "probe_pairs_trained", "closed_form_prompts", "torch_threads", "sample_batch_size",
                     "self_g_refresh"):
            if int(getattr(self, name)) < 1:
                bad(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.ref_samples < 2:
            bad("ref_samples must be >= 2 (held-out pairs are two pi_ref samples)")
        if "learned" in self.all_gs:
            if self.learned_folds < 2 or self.ns[0] // self.learned_folds <= self.learned_dim:
                bad(f"learned g: need learned_folds >= 2 and folds larger than learned_dim ({self.learned_dim})")
            if any(n % self.learned_folds for n in self.ns):
                bad(f"learned g: every n must be divisible by learned_folds = {self.learned_folds}; got {self.ns}")
        for name in ("target_sd", "beta", "lr", "sft_lr", "epochs", "noisy_sd", "w_max"):
            if not getattr(self, name) > 0:
                bad(f"{name} must be > 0; got {getattr(self, name)}")
        if not (0 <= self.eps_cdpo < 0.5 and 0 <= self.eps_rdpo < 0.5):
            bad("eps_cdpo and eps_rdpo must be in [0, 0.5)")
        if not 0 <= self.warmup_ratio < 1:
            bad("warmup_ratio must be in [0, 1)")
        if self.workers < 0:
            bad("workers must be >= 0 (0: automatic)")
        if self.probe_batch_size > self.ns[-1]:
            bad("probe_batch_size must not exceed the largest n")

    # ---------------------------------------------------------------- derived
    @property
    def all_gs(self) -> tuple:
        """``gs`` (every lam and M) then ``extra_gs`` (VRPO lam = 1 at the largest M only)."""
        return tuple(self.gs) + tuple(self.extra_gs)

    @property
    def n_max(self) -> int:
        return self.ns[-1]

    @property
    def M_max(self) -> int:
        return max(self.Ms)

    @property
    def K_max(self) -> int:
        """Responses sampled per labelled prompt: the pair and ``M_max`` extra pairs."""
        return 2 + 2 * self.M_max

    def steps(self, n: int) -> int:
        """Optimisation steps for ``n`` labelled pairs (the same for every method)."""
        return max(1, int(math.ceil(self.epochs * n / self.batch_size)))

    def n_workers(self) -> int:
        if self.workers:
            return self.workers
        from .evaluate import auto_device

        if auto_device(self.device) != "cpu":
            return 1
        return max(1, min(2, (os.cpu_count() or 1) // max(1, self.torch_threads)))

    def resolved(self) -> dict:
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
        from .evaluate import auto_device

        d["device_resolved"] = auto_device(self.device)
        d["workers_resolved"] = self.n_workers()
        return d

    def experiment_key(self) -> str:
        """Hash of every setting that changes a number (not paths, workers, device or progress)."""
        skip = {"cache_dir", "out_dir", "publish_dir", "publish", "workers", "progress", "device", "preset"}
        d = {k: v for k, v in self.resolved().items() if k not in skip and not k.endswith("_resolved")}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=json_default).encode()).hexdigest()[:12]

    def part_key(self, *fields: str, extra=None) -> str:
        d = asdict(self)
        blob = {f: d[f] for f in fields}
        if extra is not None:
            blob["extra"] = extra
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=json_default).encode()).hexdigest()[:12]


def smoke_config(**over) -> LMRegretConfig:
    """Minutes-scale settings for the test suite: the same pipeline on tiny sizes, every g once."""
    base = dict(n_eval_prompts=24, pi_ref="tiny", max_prompt_tokens=24, max_new_tokens=10, sft_steps=40,
                sft_batch_size=16, n_scale_prompts=48, ns=(32, 64), seeds=2, kappas=(0.0, 1.0), Ms=(1, 2),
                gs=("oracle",), extra_gs=("one-type", "learned", "noisy", "constant", "self"), lams=("1", "auto"),
                learned_folds=2, learned_dim=4, batch_size=16, epochs=1.0, ref_samples=2, eval_samples=1,
                probe_batch_size=8, probe_pairs=4, probe_pairs_trained=4, closed_form_prompts=8, max_pairs_gold=600, smoke=True,
                progress=False, preset="smoke", out_dir="results/llm_regret_smoke")
    base.update(over)
    return LMRegretConfig(**base)


def full_config(**over) -> LMRegretConfig:
    """The full grid (docs/llm_regret.md gives its measured cost)."""
    base = dict(ns=(250, 500, 1000, 2000), seeds=5, kappas=(0.0, 0.5, 1.0), Ms=(1, 4), gs=G_KINDS,
                preset="full", out_dir="results/llm_regret_full")
    base.update(over)
    return LMRegretConfig(**base)


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """One training run: ``method`` in BASELINES (``g = M = None``) or ``vrpo``/``vrpo-auto`` with ``g, M``."""

    kappa: float
    n: int
    method: str
    seed: int
    g: str | None = None
    M: int | None = None

    @property
    def cell(self) -> str:
        tail = f"-{self.g}-M{self.M}" if self.g else ""
        return f"k{self.kappa:g}-n{self.n}-{self.method}{tail}"

    @property
    def id(self) -> str:
        return f"{self.cell}-s{self.seed}"

    @property
    def uses_extra(self) -> bool:
        return self.method.startswith("vrpo")

    def cost(self, cfg: LMRegretConfig) -> float:
        """Relative cost for scheduling (sequences per step x steps)."""
        return cfg.steps(self.n) * (2 + 2 * (self.M or 0))


def tasks(cfg: LMRegretConfig) -> list[Task]:
    """Every training task of the sweep, most expensive first (for load balancing)."""
    out = []
    for s in range(cfg.first_seed, cfg.first_seed + cfg.seeds):
        for k in cfg.kappas:
            for n in cfg.ns:
                out += [Task(k, n, b, s) for b in cfg.baselines]
                for lam in cfg.lams:
                    meth = "vrpo" if lam == "1" else "vrpo-auto"
                    for g in cfg.gs:
                        for M in cfg.Ms:
                            out.append(Task(k, n, meth, s, g, M))
                out += [Task(k, n, "vrpo", s, g, cfg.M_max) for g in cfg.extra_gs]
    return sorted(out, key=lambda t: (-t.cost(cfg), t.id))


# --------------------------------------------------------------------------- small utilities


def _log(msg: str, t0: float) -> None:
    print(f"[llm-regret {time.time() - t0:7.1f}s] {msg}", flush=True)


def _save_npz(path: Path, **arrays) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def _load_npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _set_threads(n: int) -> None:
    """``n`` torch and BLAS threads in this process (a tiny model on a shared machine runs fastest on one)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(int(n))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
    threadpool_limits(int(n))


# --------------------------------------------------------------------------- stage: prompts


def stage_prompts(cfg: LMRegretConfig) -> dict:
    """Unique prompts (with their responses and HH subset) split into training pool and evaluation prompts."""
    from .data import load_relabeled
    from .gold import HEADS, relabeled_path

    rows, reports = {}, {}
    for obj in HEADS:
        p = relabeled_path(cfg.data_dir, obj)
        if not p.exists():
            raise FileNotFoundError(f"{p}: relabeled HH data not found; pass --data-dir pointing at the shared data "
                                    "directory (see ../shared/data/README.md)")
        df = load_relabeled(p, on_error="skip")
        reports[obj] = df.attrs["load_report"].summary()
        for r in df.itertuples(index=False):
            e = rows.setdefault(r.prompt, {"responses": [], "subset": r.data_subset})
            e["responses"] += [r.response_0, r.response_1]
    prompts = sorted(rows)  # deterministic order
    perm = _rng(cfg.split_seed, "split").permutation(len(prompts))
    if cfg.n_eval_prompts >= len(prompts) // 2:
        raise ValueError(f"n_eval_prompts ({cfg.n_eval_prompts}) must be below half the {len(prompts)} prompts")
    ev = np.sort(perm[: cfg.n_eval_prompts])
    tr = np.sort(perm[cfg.n_eval_prompts:])
    return {"prompts": prompts, "subset": [rows[p]["subset"] for p in prompts],
            "responses": [rows[p]["responses"] for p in prompts], "eval": ev, "train": tr, "load": reports}


# --------------------------------------------------------------------------- stage: pi_ref


def _load_hf(name: str, device: str):
    """Any ``transformers`` causal LM and its tokenizer by hub name or local path (pad = EOS if it has none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(name).to(device)
    return model.eval(), tok


def stage_pi_ref(cfg: LMRegretConfig, P: dict, device: str, t0: float) -> tuple:
    """``(model, tokenizer, info)``: the SFT'd small GPT-2 (cached with its tokenizer) or a model by name/path."""
    import torch
    from transformers import PreTrainedTokenizerFast

    from vrpo_common.fileio import torch_save

    from .tiny_lm import encode_pair_texts, sft, tiny_gpt2, train_bpe_tokenizer

    cache = Path(cfg.cache_dir)
    if cfg.pi_ref.startswith("hf:"):
        model, tok = _load_hf(cfg.pi_ref[3:], device)
        return model, tok, {"kind": "hf", "name": cfg.pi_ref[3:], "params": int(sum(p.numel() for p in
                                                                                    model.parameters()))}
    shape = PI_REF_PRESETS[cfg.pi_ref]
    tr = P["train"]
    key = cfg.part_key("data_dir", "split_seed", "n_eval_prompts", "pi_ref", "max_prompt_tokens", "max_new_tokens",
                       "sft_steps", "sft_batch_size", "sft_lr", extra={"shape": shape, "v": 2})
    tok_dir, path = cache / f"tokenizer-{key}", cache / f"pi_ref-{key}.pt"
    if (tok_dir / "tokenizer.json").exists():
        tok = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    else:
        tok = train_bpe_tokenizer([P["prompts"][i] + " " + r for i in tr for r in P["responses"][i]],
                                  vocab_size=shape["vocab_size"])
        tok.save_pretrained(str(tok_dir))
    model = tiny_gpt2(len(tok), shape["n_layer"], shape["n_embd"], shape["n_head"],
                      n_positions=cfg.max_prompt_tokens + cfg.max_new_tokens + 8, eos_token_id=tok.eos_token_id,
                      seed=cfg.split_seed)
    info = {"kind": "sft", "preset": cfg.pi_ref, **shape, "vocab": len(tok),
            "params": int(sum(p.numel() for p in model.parameters())), "cache": str(path)}
    if path.exists():
        blob = torch.load(path, weights_only=True)
        model.load_state_dict(blob["model"])
        info.update(sft_first_loss=blob["losses"][0], sft_last_loss=float(np.mean(blob["losses"][-20:])),
                    sft_wall_s=blob["wall_s"], cached=True)
    else:
        t = time.time()
        prompts = [P["prompts"][i] for i in tr for _ in P["responses"][i]]
        resp = [[" " + r] for i in tr for r in P["responses"][i]]
        p_ids, r_ids = encode_pair_texts(tok, prompts, resp, cfg.max_prompt_tokens, cfg.max_new_tokens)
        seqs = [p + r[0] for p, r in zip(p_ids, r_ids)]
        model.to(device)
        losses = sft(model, tok, seqs, cfg.sft_steps, cfg.sft_batch_size, cfg.sft_lr, cfg.split_seed,
                     progress=cfg.progress)
        wall = time.time() - t
        torch_save({"model": {k: v.cpu() for k, v in model.state_dict().items()}, "losses": losses, "wall_s": wall},
                   path)
        info.update(sft_first_loss=losses[0], sft_last_loss=float(np.mean(losses[-20:])), sft_wall_s=wall,
                    cached=False)
    model.to(device).eval()
    return model, tok, info


def prompt_ids(tok, prompts: list[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each prompt, its last ``max_tokens`` tokens (the turns nearest the response)."""
    return [ids[-max_tokens:] if ids else [tok.eos_token_id]
            for ids in tok(list(prompts), add_special_tokens=False)["input_ids"]]


# --------------------------------------------------------------------------- stage: gold


def _features(cfg: LMRegretConfig):
    from .gold import TextFeatures

    return TextFeatures(cfg.features, length=cfg.length_features, cache_dir=Path(cfg.cache_dir) / "embeddings")


def stage_gold(cfg: LMRegretConfig, P: dict, model, tok, t0: float) -> tuple:
    """Fit (cached) and scale the gold heads on ``pi_ref`` pairs; the learned-g projection from the same pairs."""
    from .gold import GoldPreference, fit_gold
    from .hh_reward import project_margins

    feats = _features(cfg)
    fit = fit_gold(cfg.data_dir, feats, cache_dir=cfg.cache_dir, seed=cfg.split_seed,
                   max_pairs=cfg.max_pairs_gold or None, progress=cfg.progress)
    # scaling pairs: one pi_ref pair on each of n_scale_prompts pool prompts
    idx = _rng(cfg.split_seed, "scale").choice(P["train"], size=min(cfg.n_scale_prompts, len(P["train"])),
                                              replace=False)
    pids = prompt_ids(tok, [P["prompts"][i] for i in idx], cfg.max_prompt_tokens)
    from .evaluate import sample

    S = sample(model, pids, 2, cfg.max_new_tokens, tok.eos_token_id, tok.pad_token_id,
               seed=_seed_int(cfg.split_seed, "scale-sample"), batch_size=cfg.sample_batch_size)
    phi = feats(S.texts(tok)).reshape(len(idx), 2, -1)  # (P, 2, D)
    g0 = GoldPreference.from_fit(fit, kappa=1.0, weight=cfg.weight, w_max=cfg.w_max)
    R = g0.rewards(phi)  # (P, 2, 2)
    gold = g0.scaled_to(R[:, 0], R[:, 1], cfg.target_sd)
    R = gold.rewards(phi)
    D = R[:, 0] - R[:, 1]  # (P, 2)
    proj = project_margins(phi[:, 0] - phi[:, 1], cfg.learned_dim)  # (D, d)
    info = {"heads": fit.info["heads"], "prompt_weight": {k: v for k, v in fit.info["prompt_weight"].items()
                                                          if k != "cv_by_ridge"},
            "features": fit.info["features"], "scale_A": gold.scale_A, "scale_B": gold.scale_B,
            "head_corr_on_pi_ref_pairs": float(np.corrcoef(D[:, 0], D[:, 1])[0, 1]),
            "sign_agreement_on_pi_ref_pairs": float(np.mean(np.sign(D[:, 0]) == np.sign(D[:, 1]))),
            "n_scale_pairs": int(len(idx)), "fit_s": fit.info.get("fit_s")}
    return gold, proj, info


# --------------------------------------------------------------------------- per-prompt gold weights


def prompt_q(cfg: LMRegretConfig, gold, P: dict, idx) -> np.ndarray:
    """``q(x)`` for prompts ``idx`` (used only with ``weight="prompt"``; zeros otherwise)."""
    if cfg.weight != "prompt":
        return np.zeros(len(idx))
    from .features import prompt_tail
    from .gold import TextFeatures

    e = TextFeatures("minilm-static", length=False).embed(prompt_tail([P["prompts"][i] for i in idx]))
    return gold.prompt_q(e)


# --------------------------------------------------------------------------- stage: ref bank


def stage_ref_bank(cfg: LMRegretConfig, P: dict, model, tok, gold, key: str, t0: float) -> dict:
    """``pi_ref`` samples on the evaluation prompts (cached): the bank and an independent check sample."""
    from .evaluate import Samples, response_logps, sample

    path = Path(cfg.cache_dir) / f"ref_bank-{key}.npz"
    ev = P["eval"]
    pids = prompt_ids(tok, [P["prompts"][i] for i in ev], cfg.max_prompt_tokens)
    if path.exists():
        z = _load_npz(path)
        bank = Samples.from_arrays({k[5:]: v for k, v in z.items() if k.startswith("bank_")})
        chk = Samples.from_arrays({k[6:]: v for k, v in z.items() if k.startswith("check_")})
        out = {"bank": bank, "check": chk, "R_bank": z["R_bank"], "R_check": z["R_check"],
               "ref_tf_bank": z["ref_tf_bank"], "q": z["q"], "pids": pids}
        return out
    feats = _features(cfg)
    bank = sample(model, pids, cfg.ref_samples, cfg.max_new_tokens, tok.eos_token_id, tok.pad_token_id,
                  seed=_seed_int(cfg.split_seed, "bank"), batch_size=cfg.sample_batch_size, progress=cfg.progress,
                  desc="pi_ref samples (evaluation prompts)")
    chk = sample(model, pids, cfg.eval_samples, cfg.max_new_tokens, tok.eos_token_id, tok.pad_token_id,
                 seed=_seed_int(cfg.split_seed, "bank-check"), batch_size=cfg.sample_batch_size)
    J = len(ev)
    R_bank = gold.rewards(feats(bank.texts(tok))).reshape(J, cfg.ref_samples, 2)
    R_check = gold.rewards(feats(chk.texts(tok))).reshape(J, cfg.eval_samples, 2)
    # teacher-forced pi_ref log-probs of the first held-out pair (the trainer's forward; for the margins)
    pair_ids = [[bank.ids[j * cfg.ref_samples], bank.ids[j * cfg.ref_samples + 1]] for j in range(J)]
    ref_tf = response_logps(model, pids, pair_ids, tok.pad_token_id)  # (J, 2)
    q = prompt_q(cfg, gold, P, ev)
    arrays = {**{f"bank_{k}": v for k, v in bank.to_arrays().items()},
              **{f"check_{k}": v for k, v in chk.to_arrays().items()},
              "R_bank": R_bank, "R_check": R_check, "ref_tf_bank": ref_tf, "q": q}
    _save_npz(path, **arrays)
    return {"bank": bank, "check": chk, "R_bank": R_bank, "R_check": R_check, "ref_tf_bank": ref_tf, "q": q,
            "pids": pids}


# --------------------------------------------------------------------------- stage: seed data


def seed_data_path(cfg: LMRegretConfig, key: str, seed: int) -> Path:
    return Path(cfg.cache_dir) / f"seed_data-{key}-s{seed}.npz"


def make_seed_data(cfg: LMRegretConfig, P: dict, model, tok, gold, proj, key: str, seed: int) -> Path:
    """Draw one seed's labelled prompts and ``K_max`` ``pi_ref`` responses each; features, rewards, uniforms."""
    from .evaluate import response_logps, sample

    path = seed_data_path(cfg, key, seed)
    if path.exists():
        return path
    n, K = cfg.n_max, cfg.K_max
    slots = _rng(seed, "slots").choice(P["train"], size=n, replace=True)  # (n,) prompt indices, i.i.d. from the pool
    pids = prompt_ids(tok, [P["prompts"][i] for i in slots], cfg.max_prompt_tokens)
    S = sample(model, pids, K, cfg.max_new_tokens, tok.eos_token_id, tok.pad_token_id,
               seed=_seed_int(seed, "responses"), batch_size=cfg.sample_batch_size, progress=cfg.progress,
               desc=f"seed {seed}: {n} x {K} responses ~ pi_ref")
    resp = [S.ids[i * K:(i + 1) * K] for i in range(n)]
    ref = response_logps(model, pids, resp, tok.pad_token_id)  # (n, K) teacher-forced, the trainer's forward
    phi = _features(cfg)(S.texts(tok))  # (n K, D)
    R = gold.rewards(phi).reshape(n, K, 2)
    F = (phi @ proj).reshape(n, K, -1)  # learned-g inputs
    arrays = {f"s_{k}": v for k, v in S.to_arrays().items()}
    arrays.update(slots=slots, ref=ref, gen_logp=S.logp.reshape(n, K), R=R, F=F,
                  U=_rng(seed, "labels").random(n), eps=_rng(seed, "noisy-g").standard_normal((n, 1 + cfg.M_max)),
                  q=prompt_q(cfg, gold, P, slots), pids_flat=np.concatenate([np.asarray(p) for p in pids]),
                  pids_len=np.array([len(p) for p in pids]))
    _save_npz(path, **arrays)
    return path


def load_seed_data(path: Path) -> dict:
    from .evaluate import Samples

    z = _load_npz(path)
    S = Samples.from_arrays({k[2:]: v for k, v in z.items() if k.startswith("s_")})
    n, K = z["R"].shape[:2]
    offs = np.concatenate([[0], np.cumsum(z["pids_len"])])
    z["pids"] = [z["pids_flat"][offs[i]:offs[i + 1]].tolist() for i in range(n)]
    z["resp"] = [S.ids[i * K:(i + 1) * K] for i in range(n)]
    return z


# --------------------------------------------------------------------------- labelled data of one task


def task_data(cfg: LMRegretConfig, task: Task, gold, D: dict) -> dict:
    """The labelled set of ``task``: the seed's first ``n`` prompts, ``Z = 1{U < p*}``, ``(chosen, rejected)``
    ordered by ``Z``, the ``M`` extra pairs, ``g`` for every pair and the reference log-probs, in the
    trainer's column order ``[chosen, rejected, a_1[0], a_2[0], ...]``."""
    from scipy.special import expit, logit

    from .gold import p_star, sample_labels
    from .hh_reward import learned_g

    n, M = task.n, (task.M or 0)
    R = D["R"][:n]  # (n, K, 2)
    g_w = gold.with_kappa(task.kappa)
    w = g_w.weight_of(D["q"][:n], n=n)  # (n,)
    P_ = 1 + cfg.M_max
    # p*(y_2j, y_2j+1) for every pair of every prompt
    pst = p_star(R[:, 0::2, 0], R[:, 0::2, 1], R[:, 1::2, 0], R[:, 1::2, 1], w[:, None])  # (n, P_)
    Z = sample_labels(pst[:, 0], D["U"][:n])  # (n,)
    flip = Z == 0
    order = np.where(flip[:, None], [1, 0], [0, 1])  # (n, 2): chosen, rejected positions
    cols = [0, 1] + [c for m in range(M) for c in (2 + 2 * m, 3 + 2 * m)]
    resp = [[D["resp"][i][order[i, 0]], D["resp"][i][order[i, 1]]] + [D["resp"][i][c] for c in cols[2:]]
            for i in range(n)]
    ref = D["ref"][:n][:, cols].copy()
    ref[flip, 0], ref[flip, 1] = D["ref"][:n][flip, 1], D["ref"][:n][flip, 0]
    g = g_aux = None
    if task.uses_extra and task.g != "self":
        kind = task.g
        if kind == "oracle":
            gp = pst
        elif kind == "one-type":
            h = 0 if cfg.one_type_head == "helpful" else 1
            gp = expit(R[:, 0::2, h] - R[:, 1::2, h])
        elif kind == "noisy":
            gp = expit(logit(np.clip(pst, 1e-12, 1 - 1e-12)) + cfg.noisy_sd * D["eps"][:n])
        elif kind == "constant":
            gp = np.full_like(pst, 0.5)
        elif kind == "learned":
            F = D["F"][:n]  # (n, K, d)
            X = F[:, 0] - F[:, 1]  # (n, d) margins of (y1, y2)
            Xa = (F[:, 2::2] - F[:, 3::2])[:, :M]  # (n, M, d)
            gl, ga = learned_g(X[None], Z[None], Xa.reshape(1, n * M, -1), cfg.learned_folds, cfg.learned_ridge)
            gp = np.concatenate([gl[0][:, None], ga[0].reshape(n, M)], axis=1)  # (n, 1 + M), for (y1, y2) order
            gp = np.concatenate([gp, np.full((n, P_ - 1 - M), 0.5)], axis=1)
        else:  # pragma: no cover - validated in the config
            raise ValueError(kind)
        g = np.where(flip, 1 - gp[:, 0], gp[:, 0])  # P(chosen > rejected)
        g_aux = gp[:, 1:1 + M]  # (n, M)
    return {"prompt_ids": D["pids"][:n], "resp": resp, "ref": ref, "Z": Z, "g": g, "g_aux": g_aux,
            "p_star": pst[:, 0], "label_rate": float(Z.mean()), "p_mean": float(pst[:, 0].mean())}


# --------------------------------------------------------------------------- training (VRPOTrainer)


def train_policy(cfg: LMRegretConfig, task: Task, pi_ref, tok, data: dict, work_dir: Path, device: str):
    """Train ``task``'s policy from ``pi_ref`` with :class:`llm.vrpo_trainer.VRPOTrainer`; returns (model, log)."""
    import copy

    from .vrpo_trainer import VRPOConfig, VRPOTrainer

    model = copy.deepcopy(pi_ref).to(device)
    model.train()
    n, M = task.n, (task.M or 0)
    K = 2 + 2 * M if task.uses_extra else 2
    ds = {"prompt_ids": data["prompt_ids"], "chosen_ids": [r[0] for r in data["resp"]],
          "rejected_ids": [r[1] for r in data["resp"]], "ref_logps": data["ref"][:, :K].tolist()}
    if task.uses_extra:
        ds["a_1_ids"] = [[r[2 + 2 * m] for m in range(M)] for r in data["resp"]]
        ds["a_2_ids"] = [[r[3 + 2 * m] for m in range(M)] for r in data["resp"]]
        if task.g != "self":
            ds["g"] = data["g"].tolist()
            ds["g_aux"] = data["g_aux"].tolist()
    if task.method == "dpo" or task.uses_extra:
        loss_type, eps = "sigmoid", 0.0
    elif task.method == "cdpo":
        loss_type, eps = "sigmoid", cfg.eps_cdpo
    else:
        loss_type, eps = "robust", cfg.eps_rdpo
    lam = 0.0 if not task.uses_extra else (1.0 if task.method == "vrpo" else "auto")
    steps = cfg.steps(n)
    args = VRPOConfig(
        output_dir=str(work_dir), lam=lam, g_source="self" if task.g == "self" else "columns",
        self_g_refresh=cfg.self_g_refresh, beta=cfg.beta, loss_type=loss_type, label_smoothing=eps,
        learning_rate=cfg.lr, per_device_train_batch_size=cfg.batch_size, max_steps=steps,
        warmup_steps=int(round(cfg.warmup_ratio * steps)), lr_scheduler_type="linear", seed=task.seed,
        data_seed=task.seed, precompute_ref_log_probs=True, logging_steps=max(1, steps // 10), save_strategy="no",
        report_to=[], disable_tqdm=True, use_cpu=(device == "cpu"), dataloader_num_workers=0,
        max_grad_norm=1.0, weight_decay=0.0, bf16=False, fp16=False, shared_prompt=True,
    )
    import datasets
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    datasets.disable_progress_bars()
    trainer = VRPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    for cb in (PrinterCallback, ProgressCallback):  # the driver reports progress per task
        trainer.remove_callback(cb)
    trainer.train()
    hist = [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in trainer.state.log_history]
    model.eval()
    return model, hist


# --------------------------------------------------------------------------- evaluation of one policy


def evaluate_policy(cfg: LMRegretConfig, policy, pi_ref, tok, gold_k, bank: dict, seed: int) -> tuple[dict, dict]:
    """Gold metrics of ``policy`` on the evaluation prompts; returns ``(summary, arrays)``."""
    from .evaluate import expected_accuracy, implicit_margins, kl_from_samples, response_logps, sample, win_rate

    pids = bank["pids"]
    J, S, Sr = len(pids), cfg.eval_samples, cfg.ref_samples
    smp = sample(policy, pids, S, cfg.max_new_tokens, tok.eos_token_id, tok.pad_token_id, seed=seed,
                 batch_size=cfg.sample_batch_size)
    R = gold_k.rewards(_features(cfg)(smp.texts(tok))).reshape(J, S, 2)
    w = gold_k.weight_of(bank["q"], n=J)  # (J,)
    Pw = gold_k.p(R[:, :, None, :], bank["R_bank"][:, None, :, :], w[:, None, None])  # (J, S, Sr)
    win = win_rate(Pw)
    lref = response_logps(pi_ref, [p for p in pids for _ in range(S)], [[r] for r in smp.ids],
                          tok.pad_token_id)[:, 0].reshape(J, S)
    kl = kl_from_samples(smp.logp.reshape(J, S), lref)
    pair_ids = [[bank["bank"].ids[j * Sr], bank["bank"].ids[j * Sr + 1]] for j in range(J)]
    delta = implicit_margins(policy, pids, pair_ids, bank["ref_tf_bank"], cfg.beta, tok.pad_token_id)
    p_pair = gold_k.p(bank["R_bank"][:, 0], bank["R_bank"][:, 1], w)
    acc = expected_accuracy(delta, p_pair)
    length = smp.n_tokens.reshape(J, S)
    summary = {"win_ref": win["mean"], "win_ref_mc_se": win["se"], "kl": kl["mean"], "kl_mc_se": kl["se"],
               "acc": acc["mean"], "acc_mc_se": acc["se"], "acc_bayes": acc["bayes"],
               "len_tokens": float(length.mean()), "len_tokens_mc_se": mean_se(length.mean(1))[1],
               "eos_share": float(smp.ended.mean()), "reward_A": float(R[..., 0].mean()),
               "reward_B": float(R[..., 1].mean())}
    arrays = {"R": R, "win_per_prompt": win["per_prompt"], "len": length}
    return summary, arrays


# --------------------------------------------------------------------------- stage: gradient probe at pi_ref


def _g_label(cfg: LMRegretConfig, g: str) -> str:
    return {"one-type": f"one type ({cfg.one_type_head} head only)", "noisy": f"noisy (logit sd {cfg.noisy_sd:g})",
            "learned": f"learned ({cfg.learned_folds}-fold cross-fitted)", "constant": "constant 1/2",
            "self": "self (lagged policy)", "oracle": "oracle p*"}[g]


def stage_probe_ref(cfg: LMRegretConfig, pi_ref, tok, gold, D: dict, t0: float) -> dict:
    """Gradient-variance probe at ``pi_ref`` (every kappa, M and g except ``self``) and its closed form.

    ``self`` is left out: at ``pi_ref`` the frozen policy is ``pi_ref`` itself, so ``g = 1/2`` there (the
    ``constant`` case) and its correction vanishes.

    Per-pair gradients of the first ``closed_form_prompts`` prompts of the first seed (computed once, reused
    for every kappa, g and M) give (a) the closed form for the population (moments over prompts and pairs,
    jackknife SE) and (b) the exact ratio on those examples as they are (``fixed_assignment_ratio``). The
    Monte Carlo probe draws minibatches of the same examples (with replacement, labels redrawn from ``p*``) and
    runs the training objectives through autograd: it estimates (b) exactly, so ``z = (MC - exact) / SE_MC``
    checks the derivation and the code; (a) is the prediction for the population."""
    from .evaluate import closed_form_from_moments, fixed_assignment_ratio, gradient_probe, pair_gradients_at_ref
    from .gold import p_star

    gs = [g for g in cfg.all_gs if g != "self"]
    nc = min(cfg.closed_form_prompts, cfg.n_max)
    R = D["R"][:nc]
    combos = {}
    for k in cfg.kappas:
        w = gold.with_kappa(k).weight_of(D["q"][:nc], n=nc)
        ps = p_star(R[:, 0::2, 0], R[:, 0::2, 1], R[:, 1::2, 0], R[:, 1::2, 1], w[:, None])  # (nc, P), (y1, y2) order
        for g in gs:
            d = task_data(cfg, Task(k, cfg.n_max, "vrpo", cfg.first_seed, g, cfg.M_max), gold, D)
            flip = d["Z"][:nc] == 0  # back from (chosen, rejected) to the seed's (y1, y2) order
            gg = np.concatenate([np.where(flip, 1 - d["g"][:nc], d["g"][:nc])[:, None], d["g_aux"][:nc]], axis=1)
            combos[f"{k:g}|{g}"] = (ps, gg)
    t = time.time()
    pids, resp, ref = D["pids"][:nc], D["resp"][:nc], D["ref"][:nc]
    mom = pair_gradients_at_ref(pi_ref, pids, resp, cfg.beta, tok.pad_token_id, combos, Ms=cfg.Ms)
    cf_s = time.time() - t
    out = []
    for k in cfg.kappas:
        for g in gs:
            ps, gg = combos[f"{k:g}|{g}"]
            for M in cfg.Ms:
                K = 2 + 2 * M
                row = {"kappa": k, "g": g, "M": M, "where": "pi_ref", "policy": "pi_ref"}
                cf = closed_form_from_moments(mom[f"{k:g}|{g}"], M, lam=1.0)
                row.update({f"cf_{a}": cf[a] for a in ("ratio", "ratio_se", "lam_opt", "ratio_at_lam_opt",
                                                        "ratio_at_lam_opt_se")})
                ex = fixed_assignment_ratio(mom[f"{k:g}|{g}"], M, lam=1.0)
                row["exact_ratio"] = ex["ratio"]
                if g == "oracle" or cfg.smoke:  # the Monte Carlo check
                    t = time.time()
                    pr = gradient_probe(pi_ref, pids, [r[:K] for r in resp], ref[:, :K], ps[:, 0], gg[:, 0],
                                        gg[:, 1:1 + M], cfg.beta, 1.0, tok.pad_token_id, cfg.probe_batch_size,
                                        cfg.probe_pairs, seed=_seed_int(cfg.first_seed, "probe", k, g, M),
                                        p_label=ps[:, 0], replace=True)
                    row.update({f"mc_{a}": v for a, v in pr.items() if isinstance(v, (int, float))})
                    row["mc_s"] = time.time() - t
                    diff = pr["ratio"] - ex["ratio"]
                    se = pr["ratio_se"]
                    # constant g: both ratios are exactly 1 (no correction), so no spread either
                    z = diff / se if se > 0 else (0.0 if abs(diff) < 1e-9 else math.copysign(math.inf, diff))
                    row["z_mc_vs_exact"] = z
                out.append(row)
    return {"rows": out, "closed_form_prompts": nc, "closed_form_s": cf_s}


# --------------------------------------------------------------------------- the worker


_W: dict = {}  # per-process state: config, pi_ref, tokenizer, gold, bank, seed data


def _worker_init(cfg_dict: dict, key: str, threads: int) -> None:
    """Load the cached stages into this process (workers never recompute them)."""
    _set_threads(threads)
    import warnings

    warnings.filterwarnings("ignore", message=".*loss_type=None.*")
    cfg = LMRegretConfig(**{k: v for k, v in cfg_dict.items() if k in {f.name for f in dataclasses.fields(
        LMRegretConfig)}})
    from .evaluate import auto_device
    from .gold import GoldPreference

    device = auto_device(cfg.device)
    blob = json.loads((Path(cfg.cache_dir) / f"stages-{key}.json").read_text())
    P = stage_prompts(cfg)
    model, tok, _ = stage_pi_ref(cfg, P, device, time.time())
    gold = GoldPreference.from_dict(blob["gold"])
    bank = stage_ref_bank(cfg, P, model, tok, gold, key, time.time())
    _W.update(cfg=cfg, key=key, device=device, P=P, pi_ref=model, tok=tok, gold=gold,
              proj=np.asarray(blob["proj"]), bank=bank, seed_data={})


def _seed_task(seed: int) -> str:
    W = _W
    return str(make_seed_data(W["cfg"], W["P"], W["pi_ref"], W["tok"], W["gold"], W["proj"], W["key"], seed))


def task_paths(cfg: LMRegretConfig, task: Task) -> tuple[Path, Path]:
    d = Path(cfg.out_dir) / "tasks"
    return d / f"{task.id}.json", d / f"{task.id}.npz"


def _run_task(task: Task) -> dict:
    """Train and evaluate one task (in a worker); writes its JSON and NPZ atomically, returns the JSON."""
    import shutil

    import torch

    W = _W
    cfg, tok, gold = W["cfg"], W["tok"], W["gold"]
    t0, c0 = time.time(), time.process_time()
    if task.seed not in W["seed_data"]:
        W["seed_data"] = {task.seed: load_seed_data(seed_data_path(cfg, W["key"], task.seed))}
    D = W["seed_data"][task.seed]
    data = task_data(cfg, task, gold, D)
    torch.manual_seed(_seed_int(task.seed, task.cell, "torch"))
    work = Path(cfg.out_dir) / "tmp" / task.id
    policy, hist = train_policy(cfg, task, W["pi_ref"], tok, data, work, W["device"])
    shutil.rmtree(work, ignore_errors=True)
    train_s, train_cpu_s = time.time() - t0, time.process_time() - c0
    gold_k = gold.with_kappa(task.kappa)
    t, c = time.time(), time.process_time()
    summ, arrays = evaluate_policy(cfg, policy, W["pi_ref"], tok, gold_k, W["bank"], _seed_int(task.seed, task.cell,
                                                                                               "eval"))
    eval_s, eval_cpu_s = time.time() - t, time.process_time() - c
    probe = None
    if cfg.probe_trained and task.seed == cfg.first_seed and task.n == cfg.n_max and (
            task.method == "dpo" or (task.method == "vrpo" and task.g == "oracle" and task.M == cfg.M_max)):
        from .evaluate import gradient_probe

        pdata = data if task.method == "vrpo" else task_data(cfg, Task(task.kappa, task.n, "vrpo", task.seed,
                                                                        "oracle", cfg.M_max), gold, D)
        K = cfg.K_max
        t = time.time()
        probe = gradient_probe(policy, pdata["prompt_ids"], [r[:K] for r in pdata["resp"]], pdata["ref"][:, :K],
                               np.ones(task.n), pdata["g"], pdata["g_aux"], cfg.beta, 1.0, tok.pad_token_id,
                               cfg.probe_batch_size, cfg.probe_pairs_trained,
                               seed=_seed_int(task.seed, task.cell, "probe"))
        probe["s"] = time.time() - t
    lam_final = next((h["lam"] for h in reversed(hist) if "lam" in h), None)
    res = {"task": asdict(task), "cell": task.cell, "id": task.id, "experiment_key": cfg.experiment_key(),
           "label_rate": data["label_rate"], "p_mean": data["p_mean"], "steps": cfg.steps(task.n),
           "final_loss": next((h["loss"] for h in reversed(hist) if "loss" in h), None), "lam_final": lam_final,
           "train_s": train_s, "eval_s": eval_s, "train_cpu_s": train_cpu_s, "eval_cpu_s": eval_cpu_s,
           "history": hist, "probe": probe, **summ}
    j, z = task_paths(cfg, task)
    _save_npz(z, **arrays)
    write_json(j, res, indent=1)  # written last: its presence marks the task done
    return res


def _probe_done(cfg: LMRegretConfig) -> bool:
    p = Path(cfg.out_dir) / "probe_ref.json"
    try:
        return p.exists() and json.loads(p.read_text()).get("experiment_key") == cfg.experiment_key()
    except (json.JSONDecodeError, OSError):
        return False


def _job(x) -> dict:
    """A pool job: a training task, or ``"probe_ref"`` (the gradient probe at pi_ref on the first seed's data)."""
    if x != "probe_ref":
        return _run_task(x)
    W = _W
    cfg = W["cfg"]
    D0 = load_seed_data(seed_data_path(cfg, W["key"], cfg.first_seed))
    res = {**stage_probe_ref(cfg, W["pi_ref"], W["tok"], W["gold"], D0, time.time()),
           "experiment_key": cfg.experiment_key()}
    res["mc_s"] = sum(r.get("mc_s", 0.0) for r in res["rows"])
    write_json(Path(cfg.out_dir) / "probe_ref.json", res, indent=1)
    return res


def _done(cfg: LMRegretConfig, task: Task) -> bool:
    j, z = task_paths(cfg, task)
    if not (j.exists() and z.exists()):
        return False
    try:
        return json.loads(j.read_text()).get("experiment_key") == cfg.experiment_key()
    except (json.JSONDecodeError, OSError):
        return False


# --------------------------------------------------------------------------- the driver


def _stage_key(cfg: LMRegretConfig, pinfo: dict) -> str:
    """Cache key of the ref bank and the seed data: everything they depend on."""
    return cfg.part_key("data_dir", "split_seed", "n_eval_prompts", "pi_ref", "max_prompt_tokens", "max_new_tokens",
                        "sft_steps", "sft_batch_size", "sft_lr", "features", "length_features", "target_sd", "weight",
                        "w_max", "n_scale_prompts", "ref_samples", "eval_samples", "sample_batch_size", "learned_dim",
                        "max_pairs_gold", "ns", "Ms", extra={"pi_ref": pinfo.get("name", pinfo.get("cache")), "v": 1})


def _pool(cfg: LMRegretConfig, key: str):
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    return ProcessPoolExecutor(max_workers=cfg.n_workers(), mp_context=get_context("spawn"),
                               initializer=_worker_init, initargs=(asdict(cfg), key, cfg.torch_threads))


def _map(cfg: LMRegretConfig, key: str, fn, items: list, label: str, t0: float, on_done=None) -> list:
    """``fn`` over ``items`` in ``cfg.n_workers()`` processes (in this process for one worker), with progress."""
    out, start = [], time.time()
    if not items:
        return out
    if cfg.n_workers() == 1:
        if not _W or _W.get("key") != key:
            _worker_init(asdict(cfg), key, cfg.torch_threads)
        it = (fn(x) for x in items)
        results = ((x, r) for x, r in zip(items, it))
    else:
        from concurrent.futures import as_completed

        ex = _pool(cfg, key)
        futs = {ex.submit(fn, x): x for x in items}
        results = ((futs[f], f.result()) for f in as_completed(futs))
    try:
        for i, (x, r) in enumerate(results, 1):
            out.append(r)
            el = time.time() - start
            eta = el / i * (len(items) - i)
            msg = on_done(x, r) if on_done else str(x)
            if cfg.progress or i == len(items):
                _log(f"{label} {i}/{len(items)} {msg} (elapsed {el:.0f}s, ETA {eta:.0f}s)", t0)
    finally:
        if cfg.n_workers() > 1:
            ex.shutdown(wait=True, cancel_futures=True)
    return out


def run(cfg: LMRegretConfig, make_report: bool = True) -> dict:
    """Run every stage (reusing caches and finished tasks); returns the run record (also ``out_dir/run.json``)."""
    from .evaluate import auto_device, win_rate
    from .gold import pstar_summary

    t0 = time.time()
    load_start = list(os.getloadavg())
    _set_threads(cfg.torch_threads)
    device = auto_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    _log(f"config {cfg.preset}: ns={list(cfg.ns)}, seeds={cfg.seeds}, kappas={list(cfg.kappas)}, Ms={list(cfg.Ms)}, "
         f"g={list(cfg.gs)} (+ {list(cfg.extra_gs)} at lam=1, M={cfg.M_max}), lams={list(cfg.lams)}, baselines={list(cfg.baselines)}; device {device}, "
         f"{cfg.n_workers()} worker(s) x {cfg.torch_threads} torch thread(s); load average {load_start[0]:.2f}", t0)

    t = time.time()
    P = stage_prompts(cfg)
    model, tok, pinfo = stage_pi_ref(cfg, P, device, t0)
    timings["pi_ref_s"] = time.time() - t
    _log(f"pi_ref: {pinfo['params']:,} parameters ({'cached' if pinfo.get('cached') else 'trained'}; SFT loss "
         f"{pinfo.get('sft_first_loss', float('nan')):.2f} -> {pinfo.get('sft_last_loss', float('nan')):.2f}); "
         f"{len(P['train'])} pool prompts, {len(P['eval'])} evaluation prompts", t0)

    t = time.time()
    gold, proj, ginfo = stage_gold(cfg, P, model, tok, t0)
    key = _stage_key(cfg, pinfo)
    write_json(Path(cfg.cache_dir) / f"stages-{key}.json", {"gold": gold.to_dict(), "proj": proj.tolist()})
    timings["gold_s"] = time.time() - t
    _log(f"gold: heads CV accuracy on GPT-3.5 labels helpful {ginfo['heads']['helpful']['cv_acc']:.3f}, harmless "
         f"{ginfo['heads']['harmless']['cv_acc']:.3f}; correlation of the two heads' reward differences on pi_ref "
         f"pairs {ginfo['head_corr_on_pi_ref_pairs']:+.2f}", t0)

    t = time.time()
    bank = stage_ref_bank(cfg, P, model, tok, gold, key, t0)
    J = len(P["eval"])
    gold_checks = {}
    for k in cfg.kappas:
        gk = gold.with_kappa(k)
        w = gk.weight_of(bank["q"], n=J)
        Rb = bank["R_bank"]
        pairs = gk.p(Rb[:, 0::2][:, : cfg.ref_samples // 2], Rb[:, 1::2][:, : cfg.ref_samples // 2], w[:, None])
        self_win = win_rate(gk.p(bank["R_check"][:, :, None], Rb[:, None], w[:, None, None]))
        gold_checks[f"{k:g}"] = {"p_star": pstar_summary(pairs), "pi_ref_vs_pi_ref": {
            kk: v for kk, v in self_win.items() if kk != "per_prompt"}, "mean_w": float(np.mean(w))}
    timings["ref_bank_s"] = time.time() - t
    gold_extra = {"pi_ref_len_tokens": float(bank["bank"].n_tokens.mean()),
                  "pi_ref_eos_share": float(bank["bank"].ended.mean()),
                  "pi_ref_reward_A": float(bank["R_bank"][..., 0].mean()),
                  "pi_ref_reward_B": float(bank["R_bank"][..., 1].mean())}
    for k, v in gold_checks.items():
        s = v["p_star"]
        _log(f"kappa={k}: p* on pi_ref pairs: median {s['median']:.2f}, IQR [{s['q25']:.2f}, {s['q75']:.2f}], "
             f"mean |p*-1/2| {s['mean_abs_dev']:.3f}; pi_ref vs pi_ref win rate "
             f"{v['pi_ref_vs_pi_ref']['mean']:.4f} ± {v['pi_ref_vs_pi_ref']['se']:.4f}", t0)

    t = time.time()
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
    todo = [s for s in seeds if not seed_data_path(cfg, key, s).exists()]
    _map(cfg, key, _seed_task, todo, "seed data", t0, on_done=lambda s, r: f"seed {s}")
    timings["seed_data_s"] = time.time() - t

    t = time.time()
    all_tasks = tasks(cfg)
    todo = [x for x in all_tasks if not _done(cfg, x)]
    jobs = ([] if _probe_done(cfg) else ["probe_ref"]) + todo
    _log(f"training: {len(all_tasks)} tasks ({len(all_tasks) - len(todo)} already done), "
         f"{sum(cfg.steps(x.n) for x in todo)} optimisation steps in all"
         + ("; the gradient probe at pi_ref runs beside them" if jobs and jobs[0] == "probe_ref" else ""), t0)

    def fmt(x, r):
        if x == "probe_ref":
            return f"gradient probe at pi_ref ({r['closed_form_s'] + r['mc_s']:.0f}s)"
        return (f"{x.id}: win vs pi_ref {r['win_ref']:.3f}, KL {r['kl']:.2f}, train {r['train_s']:.1f}s, "
                f"eval {r['eval_s']:.1f}s")

    _map(cfg, key, _job, jobs, "job", t0, on_done=fmt)
    timings["train_eval_s"] = time.time() - t
    timings["tasks_run"] = len(todo)
    probe_ref = json.loads((out / "probe_ref.json").read_text())
    timings["probe_ref_s"] = probe_ref["closed_form_s"] + probe_ref["mc_s"]
    for r in probe_ref["rows"]:
        if "mc_ratio" in r:
            _log(f"gradient variance at pi_ref, kappa={r['kappa']:g}, g={r['g']}, M={r['M']}: VRPO/DPO "
                 f"{r['mc_ratio']:.3f} [{r['mc_ratio_lo']:.3f}, {r['mc_ratio_hi']:.3f}] (Monte Carlo) vs "
                 f"{r['exact_ratio']:.3f} (exact on the probed examples), z = {r['z_mc_vs_exact']:+.2f}; closed form "
                 f"for the population {r['cf_ratio']:.3f} ± {r['cf_ratio_se']:.3f}", t0)

    record = {"config": cfg.resolved(), "experiment_key": cfg.experiment_key(), "stage_key": key,
              "pi_ref": pinfo, "gold": ginfo, "gold_checks": gold_checks, "gold_checks_extra": gold_extra,
              "data": {"n_prompts": len(P["prompts"]), "n_pool": len(P["train"]), "n_eval": len(P["eval"]),
                       "load": P["load"]},
              "versions": _versions(), "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    t = time.time()
    agg = aggregate(cfg, record)
    timings["aggregate_s"] = time.time() - t
    timings["total_s"] = time.time() - t0
    timings["load_avg_start"] = load_start
    timings["load_avg_end"] = list(os.getloadavg())
    record["timings"] = timings
    write_json(out / "run.json", record, indent=1)
    if make_report:
        from .lm_regret_report import write_report

        t = time.time()
        write_report(cfg, record, agg)
        timings["report_s"] = time.time() - t
        write_json(out / "run.json", record, indent=1)
    _log(f"done in {timings['total_s']:.0f}s (load average {load_start[0]:.2f} at start, "
         f"{timings['load_avg_end'][0]:.2f} at the end); results in {out}", t0)
    return record


def _versions() -> dict:
    import torch
    import transformers
    import trl

    import vrpo

    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "vrpo": vrpo.__version__}


# --------------------------------------------------------------------------- aggregation


def _t_interval(x: np.ndarray) -> dict:
    """Mean over seeds with its Student-t 95% interval (``n - 1`` degrees of freedom)."""
    from scipy.stats import t as student

    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    m = float(x.mean()) if x.size else float("nan")
    if x.size < 2:
        return {"mean": m, "sd": float("nan"), "lo": float("nan"), "hi": float("nan"), "n_seeds": int(x.size)}
    sd = float(x.std(ddof=1))
    h = float(student.ppf(0.975, x.size - 1)) * sd / math.sqrt(x.size)
    return {"mean": m, "sd": sd, "lo": m - h, "hi": m + h, "n_seeds": int(x.size)}


def aggregate(cfg: LMRegretConfig, record: dict) -> dict:
    """Tidy table (``out_dir/results.parquet``, one row per cell and seed, config embedded) and cell summaries.

    Adds per row the head-to-head win rate against the same-seed DPO policy (``win_dpo``, mean of ``p*``
    over independent sample pairs) and the paired difference ``win_ref - win_ref(DPO)``. Cell summaries:
    mean over seeds with a Student-t 95% interval, and the Monte Carlo SE of the seed-averaged win rate
    (clustered by evaluation prompt). Verdicts compare the head-to-head interval with 1/2.
    """
    import pandas as pd

    from vrpo_common.fileio import write_table

    from .evaluate import win_rate
    from .gold import GoldPreference

    gold = GoldPreference.from_dict(json.loads((Path(cfg.cache_dir) / f"stages-{record['stage_key']}.json")
                                               .read_text())["gold"])
    q = _load_npz(Path(cfg.cache_dir) / f"ref_bank-{record['stage_key']}.npz")["q"]
    rows, arrays = [], {}
    for x in tasks(cfg):
        j, z = task_paths(cfg, x)
        if not _done(cfg, x):
            raise FileNotFoundError(f"task {x.id} has no result in {j.parent}; rerun `vrpo llm-regret` to finish it")
        r = json.loads(j.read_text())
        arrays[x.id] = _load_npz(z)
        row = {"kappa": x.kappa, "n": x.n, "method": x.method, "g": x.g or "-", "M": x.M or 0, "seed": x.seed,
               "cell": x.cell}
        for k in ("win_ref", "win_ref_mc_se", "kl", "kl_mc_se", "acc", "acc_mc_se", "acc_bayes", "len_tokens",
                  "len_tokens_mc_se", "eos_share", "reward_A", "reward_B", "label_rate", "p_mean", "steps",
                  "final_loss", "lam_final", "train_s", "eval_s", "train_cpu_s", "eval_cpu_s"):
            row[k] = r.get(k)
        rows.append(row)
    df = pd.DataFrame(rows)
    df["lam_final"] = df["lam_final"].astype(float)
    df["win_dpo"], df["win_dpo_mc_se"], df["d_win_ref"] = np.nan, np.nan, np.nan
    per_prompt_dpo = {}
    for i, r in df.iterrows():
        ref_id = Task(r.kappa, r.n, "dpo", r.seed).id
        gk = gold.with_kappa(r.kappa)
        w = gk.weight_of(q, n=len(q))
        if r.method == "dpo":
            continue
        RA, RD = arrays[Task(r.kappa, r.n, r.method, r.seed, None if r.g == "-" else r.g,
                             None if r.M == 0 else r.M).id]["R"], arrays[ref_id]["R"]
        wr = win_rate(gk.p(RA[:, :, None], RD[:, None], w[:, None, None]))
        df.loc[i, "win_dpo"], df.loc[i, "win_dpo_mc_se"] = wr["mean"], wr["se"]
        per_prompt_dpo[(r.cell, r.seed)] = wr["per_prompt"]
        df.loc[i, "d_win_ref"] = r.win_ref - df[(df.cell == Task(r.kappa, r.n, "dpo", r.seed).cell)
                                                & (df.seed == r.seed)].win_ref.iloc[0]
    df = df.sort_values(["kappa", "n", "method", "g", "M", "seed"]).reset_index(drop=True)
    meta = {"config": cfg.resolved(), "experiment_key": cfg.experiment_key(), "columns": {
        "win_ref": "gold win rate vs pi_ref: mean of p*(x, y, y') over policy samples y and pi_ref samples y' "
                   "on the held-out prompts", "win_dpo": "gold win rate vs the same-seed DPO policy",
        "d_win_ref": "win_ref minus the same-seed DPO's win_ref", "kl": "KL(policy || pi_ref) from samples (nats)",
        "acc": "expected held-out implicit-reward accuracy under p*", "len_tokens": "mean generated tokens"}}
    write_table(df, Path(cfg.out_dir) / "results.parquet", meta)
    # cell summaries
    cells = []
    for cell, grp in df.groupby("cell", sort=False):
        r0 = grp.iloc[0]
        s = {"cell": cell, "kappa": r0.kappa, "n": int(r0.n), "method": r0.method, "g": r0.g, "M": int(r0.M)}
        for col in ("win_ref", "win_dpo", "d_win_ref", "kl", "acc", "len_tokens", "lam_final"):
            ti = _t_interval(grp[col].to_numpy(float))
            s.update({f"{col}_{k}": v for k, v in ti.items()})
        # Monte Carlo SE of the seed-averaged win rate vs pi_ref, clustered by evaluation prompt
        per = np.mean([arrays[Task(r0.kappa, r0.n, r0.method, int(sd), None if r0.g == "-" else r0.g,
                                   None if r0.M == 0 else int(r0.M)).id]["win_per_prompt"] for sd in grp.seed], axis=0)
        s["win_ref_mc_se_of_mean"] = mean_se(per)[1]
        if r0.method != "dpo":
            per = np.mean([per_prompt_dpo[(cell, sd)] for sd in grp.seed], axis=0)
            s["win_dpo_mc_se_of_mean"] = mean_se(per)[1]
            lo, hi = s["win_dpo_lo"], s["win_dpo_hi"]
            s["verdict"] = "helps" if lo > 0.5 else ("hurts" if hi < 0.5 else "no detectable difference")
        cells.append(s)
    summ = pd.DataFrame(cells)
    summ.to_csv(Path(cfg.out_dir) / "cells.csv", index=False)
    return {"table": df, "cells": summ}
