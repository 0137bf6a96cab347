"""DPO / VRPO trainer for any ``transformers`` causal LM (``lam = 0`` is DPO, same code).

One optimisation step (``grad_accum`` micro-batches of ``batch_size`` examples):

1. the policy's summed log-probs of (chosen, rejected, a_1, a_2) for every example in
   one batched forward (:func:`llm.vrpo_loss.sequence_logps`, shared-prompt or naive);
2. the cached reference log-probs (computed once, at construction or from disk);
3. ``g`` for both pairs: from data columns, from a preference model (both resolved
   once into :class:`PreferenceData`), or ``self``: a frozen copy of the policy
   refreshed every ``self_g_refresh`` steps, ``g = sigma(delta_frozen)``;
4. :func:`llm.vrpo_loss.vrpo_objective` (i.e. :func:`vrpo.loss.vr_objective`).

Checkpoints (``out_dir/checkpoint.pt``, written atomically) carry the resolved
config, model/optimizer/scheduler state, the frozen ``g`` copy and the history;
:meth:`VRPOTrainer.train` resumes from one and continues identically (data order
is a function of ``seed`` and the step). Non-finite losses, margins or gradients
stop training with :class:`NonFiniteError`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .tiny_lm import atomic_save, encode_pair_texts
from .vrpo_loss import collate, dpo_margins, self_g, sequence_logps, vrpo_objective

__all__ = [
    "TrainerConfig",
    "PreferenceData",
    "NonFiniteError",
    "build_preference_data",
    "compute_ref_logps",
    "VRPOTrainer",
    "model_fingerprint",
]

G_SOURCES = ("columns", "model", "self", "constant")


class NonFiniteError(FloatingPointError):
    """Training produced a NaN/inf loss, margin or gradient norm."""


@dataclass
class TrainerConfig:
    """Resolved settings of one DPO/VRPO run (written into every checkpoint).

    ``lam = 0`` is DPO (``g`` and the extra pair are then never touched);
    ``lam = 1`` the paper's VRPO. ``g_source``: ``columns`` (data columns or a
    preference model, resolved into :class:`PreferenceData`), ``self`` (frozen
    policy refreshed every ``self_g_refresh`` steps), ``constant`` (1/2).
    """

    lam: float = 1.0
    beta: float = 0.1
    g_source: str = "columns"
    self_g_refresh: int = 20
    lr: float = 1e-4
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 100
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    shared_prompt: bool = True
    precision: str = "fp32"
    seed: int = 0
    checkpoint_every: int = 0
    out_dir: str | None = None
    progress: bool = True

    def __post_init__(self):
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam)):
            raise ValueError(f"lam must be a finite number, got {self.lam!r}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.g_source not in G_SOURCES:
            raise ValueError(f"g_source must be one of {G_SOURCES}, got {self.g_source!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        for name in ("batch_size", "grad_accum", "max_steps", "self_g_refresh"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.max_grad_norm <= 0 or self.warmup_steps < 0 or self.checkpoint_every < 0:
            raise ValueError("lr and max_grad_norm must be > 0; warmup_steps and checkpoint_every >= 0")

    @property
    def method(self) -> str:
        return "dpo" if self.lam == 0 else "vrpo"

    @property
    def K(self) -> int:
        """Sequences per example: 2 for DPO, 4 for VRPO."""
        return 2 if self.lam == 0 else 4


@dataclass
class PreferenceData:
    """Tokenized preference pairs with their extra pair and auxiliary probabilities.

    ``response_ids[i] = [chosen, rejected, a_1, a_2]`` (a_1/a_2 may be missing for DPO-only
    data); ``Z`` (n,) labels (1 = chosen preferred); ``g`` (n,) P(chosen > rejected);
    ``g_aux`` (n,) P(a_1 > a_2).
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[list[int]]]
    Z: np.ndarray
    g: np.ndarray | None = None
    g_aux: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def has_aux(self) -> bool:
        return len(self.response_ids[0]) >= 4

    def batch(self, idx: Sequence[int], K: int):
        return collate([self.prompt_ids[i] for i in idx], [self.response_ids[i][:K] for i in idx])

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.prompt_ids, self.response_ids]).encode())
        return h.hexdigest()[:16]


def _pairwise_g(p_a, p_b) -> np.ndarray:
    """Per-response preference columns -> P(a > b) = p_a / (p_a + p_b) (identity when p_b = 1 - p_a)."""
    p_a, p_b = np.asarray(p_a, float), np.asarray(p_b, float)
    tot = p_a + p_b
    return np.where(tot > 0, p_a / np.where(tot > 0, tot, 1.0), 0.5)


def build_preference_data(
    tokenizer,
    df,
    max_prompt_tokens: int,
    max_response_tokens: int,
    g_model: Callable[[list[str], list[str], list[str]], np.ndarray] | None = None,
) -> PreferenceData:
    """Tokenize a TRL-style preference table into :class:`PreferenceData`.

    ``df`` columns: ``prompt, chosen, rejected``; optional ``a_1, a_2`` (extra pair from
    ``pi_ref``), optional ``Z`` (default 1), and ``g`` from either
    ``chosen_preference, rejected_preference, a_1_preference, a_2_preference``
    (the reference code's format: per-response probabilities, turned into
    ``P(y1 > y2) = p1 / (p1 + p2)``) or ``g_model(prompts, responses_a, responses_b) -> P(a > b)``.
    """
    has_aux = "a_1" in df.columns and "a_2" in df.columns
    cols = ["chosen", "rejected"] + (["a_1", "a_2"] if has_aux else [])
    prompts = df["prompt"].tolist()
    responses = [[str(row[c]) for c in cols] for _, row in df[cols].iterrows()]
    p_ids, r_ids = encode_pair_texts(tokenizer, prompts, responses, max_prompt_tokens, max_response_tokens)
    Z = df["Z"].to_numpy(float) if "Z" in df.columns else np.ones(len(df))
    g = g_aux = None
    if g_model is not None:
        g = np.asarray(g_model(prompts, df["chosen"].tolist(), df["rejected"].tolist()), float)
        if has_aux:
            g_aux = np.asarray(g_model(prompts, df["a_1"].tolist(), df["a_2"].tolist()), float)
    elif {"chosen_preference", "rejected_preference"} <= set(df.columns):
        g = _pairwise_g(df["chosen_preference"], df["rejected_preference"])
        if has_aux and {"a_1_preference", "a_2_preference"} <= set(df.columns):
            g_aux = _pairwise_g(df["a_1_preference"], df["a_2_preference"])
    for name, v in (("Z", Z), ("g", g), ("g_aux", g_aux)):
        if v is not None and (v.shape != (len(df),) or not np.all((v >= 0) & (v <= 1))):
            raise ValueError(f"{name} must be (n,) probabilities in [0, 1]")
    return PreferenceData(p_ids, r_ids, Z, g, g_aux)


def model_fingerprint(model) -> str:
    """Cheap content hash of a model: config plus per-tensor sums and first values."""
    h = hashlib.sha256(model.config.to_json_string().encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            flat = p.detach().reshape(-1).float()
            h.update(name.encode())
            h.update(np.float64(flat.double().sum().item()).tobytes())
            h.update(flat[:8].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _autocast(model, precision: str):
    if precision != "bf16":
        return contextlib.nullcontext()
    device_type = next(model.parameters()).device.type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


@torch.no_grad()
def compute_ref_logps(model, data: PreferenceData, K: int, pad_id: int, batch_size: int = 16,
                      shared_prompt: bool = True, precision: str = "fp32", cache_path: str | os.PathLike | None = None,
                      progress: bool = True, desc: str = "ref log-probs") -> torch.Tensor:
    """(n, K) summed log-probs of every response under ``model`` (eval mode, no grad).

    With ``cache_path`` the result is stored (atomically) keyed by the model's and
    the data's fingerprints, and reused when both match.
    """
    from tqdm.auto import tqdm

    key = {"model": model_fingerprint(model), "data": data.fingerprint(), "K": K}
    if cache_path is not None and Path(cache_path).exists():
        blob = torch.load(cache_path, weights_only=False)
        if blob.get("key") == key:
            return blob["logps"]
    was_training = model.training
    model.eval()
    out = []
    for s in tqdm(range(0, len(data), batch_size), desc=desc, disable=not progress, mininterval=2):
        idx = list(range(s, min(s + batch_size, len(data))))
        with _autocast(model, precision):
            out.append(sequence_logps(model, data.batch(idx, K), pad_id, shared_prompt).float().cpu())
    model.train(was_training)
    logps = torch.cat(out)  # (n, K)
    if cache_path is not None:
        atomic_save({"key": key, "logps": logps}, cache_path)
    return logps


@dataclass
class StepRecord:
    step: int
    loss: float
    margin: float
    acc: float
    grad_norm: float


class VRPOTrainer:
    """DPO/VRPO on a causal LM. ``model`` starts at ``pi_ref`` unless ``ref_logps`` are given.

    ``extra_config``: any JSON-able resolved settings of the surrounding experiment,
    stored next to ``cfg`` in checkpoints.
    """

    def __init__(self, model, data: PreferenceData, cfg: TrainerConfig, pad_id: int,
                 ref_logps: torch.Tensor | None = None, ref_cache_path: str | os.PathLike | None = None,
                 extra_config: dict | None = None):
        self.model, self.data, self.cfg, self.pad_id = model, data, cfg, pad_id
        self.extra_config = extra_config or {}
        if cfg.lam != 0:
            if not data.has_aux:
                raise ValueError("VRPO (lam != 0) needs the extra pair a_1, a_2 for every prompt")
            if cfg.g_source == "columns" and (data.g is None or data.g_aux is None):
                raise ValueError("g_source='columns' needs g and g_aux in the data (preference columns or g_model)")
        if ref_logps is None:
            ref_logps = compute_ref_logps(model, data, cfg.K, pad_id, batch_size=2 * cfg.batch_size,
                                          shared_prompt=cfg.shared_prompt, precision=cfg.precision,
                                          cache_path=ref_cache_path, progress=cfg.progress)
        if ref_logps.shape[0] != len(data) or ref_logps.shape[1] < cfg.K:
            raise ValueError(f"ref_logps has shape {tuple(ref_logps.shape)}, need ({len(data)}, >= {cfg.K})")
        self.ref_logps = ref_logps[:, : cfg.K].float()
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warm = max(cfg.warmup_steps, 1)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warm))
        self.step = 0
        self.history: list[dict] = []
        self.frozen = None
        if cfg.lam != 0 and cfg.g_source == "self":
            self.frozen = copy.deepcopy(model).eval()
            for p in self.frozen.parameters():
                p.requires_grad_(False)

    # ------------------------------------------------------------------ data order
    def indices_for_step(self, step: int) -> list[int]:
        """Example indices of optimisation step ``step``: consecutive slices of seeded per-epoch permutations."""
        n, E = len(self.data), self.cfg.batch_size * self.cfg.grad_accum
        out, pos = [], step * E
        while len(out) < E:
            epoch, off = divmod(pos, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch))
            take = min(E - len(out), n - off)
            out.extend(perm[off : off + take].tolist())
            pos += take
        return out

    # ------------------------------------------------------------------ the loss
    def _g(self, idx: list[int], batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        cfg = self.cfg
        if cfg.lam == 0:
            return None, None
        if cfg.g_source == "constant":
            half = torch.full((len(idx),), 0.5)
            return half, half
        if cfg.g_source == "self":
            with _autocast(self.frozen, cfg.precision):
                frozen_logps = sequence_logps(self.frozen, batch, self.pad_id, cfg.shared_prompt).float()
            g_both = self_g(frozen_logps, self.ref_logps[idx], cfg.beta)  # (B, 2)
            return g_both[:, 0], g_both[:, 1]
        return (torch.as_tensor(self.data.g[idx], dtype=torch.float32),
                torch.as_tensor(self.data.g_aux[idx], dtype=torch.float32))

    def loss_on(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(scalar loss, (B,) labelled margins) on examples ``idx`` with gradients attached."""
        cfg = self.cfg
        batch = self.data.batch(idx, cfg.K)
        with _autocast(self.model, cfg.precision):
            logps = sequence_logps(self.model, batch, self.pad_id, cfg.shared_prompt).float()  # (B, K)
        ref = self.ref_logps[idx]
        g, g_aux = self._g(idx, batch)
        Z = torch.as_tensor(self.data.Z[idx], dtype=torch.float32)
        loss = vrpo_objective(logps, ref, cfg.beta, cfg.lam, Z=Z, g=g, g_aux=g_aux)
        return loss, dpo_margins(logps.detach(), ref, cfg.beta)[:, 0]

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path | None:
        return Path(self.cfg.out_dir) / "checkpoint.pt" if self.cfg.out_dir else None

    def resolved_config(self) -> dict:
        return {"trainer": dataclasses.asdict(self.cfg), "method": self.cfg.method, **self.extra_config}

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> None:
        path = path or self.checkpoint_path
        if path is None:
            raise ValueError("no checkpoint path: set cfg.out_dir or pass path")
        atomic_save({
            "config": self.resolved_config(),
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "frozen": self.frozen.state_dict() if self.frozen is not None else None,
            "history": self.history,
            "ref_logps": self.ref_logps,
        }, path)

    def load_checkpoint(self, path: str | os.PathLike | None = None) -> None:
        path = path or self.checkpoint_path
        blob = torch.load(path, weights_only=False)
        saved = blob["config"]["trainer"]
        mine = dataclasses.asdict(self.cfg)
        diff = {k: (saved.get(k), v) for k, v in mine.items()
                if k not in ("max_steps", "progress", "checkpoint_every", "out_dir") and saved.get(k) != v}
        if diff:
            raise ValueError(f"checkpoint {path} was written with different settings (saved, now): {diff}")
        self.model.load_state_dict(blob["model"])
        self.opt.load_state_dict(blob["optimizer"])
        self.sched.load_state_dict(blob["scheduler"])
        if self.frozen is not None and blob["frozen"] is not None:
            self.frozen.load_state_dict(blob["frozen"])
        if blob["ref_logps"].shape != self.ref_logps.shape:
            raise ValueError(f"checkpoint {path} holds reference log-probs of shape {tuple(blob['ref_logps'].shape)}, "
                             f"this data needs {tuple(self.ref_logps.shape)}: was it written for other data?")
        self.ref_logps = blob["ref_logps"]  # pi_ref's, whatever model this trainer was constructed with
        self.step, self.history = blob["step"], blob["history"]

    # ------------------------------------------------------------------ training
    def _check_finite(self, what: str, value: torch.Tensor, idx: list[int], margins: torch.Tensor | None = None):
        if bool(torch.isfinite(value).all()):
            return
        detail = ""
        if margins is not None:
            detail = f"; labelled margins min/max {margins.min().item():.3g}/{margins.max().item():.3g}"
        raise NonFiniteError(
            f"{self.cfg.method} step {self.step}: {what} is not finite ({value.flatten()[:4].tolist()}){detail}; "
            f"examples {idx[:8]}{'...' if len(idx) > 8 else ''}. Stopped before the optimizer step: lower lr or "
            f"beta, use precision='fp32', or check the data/ref log-probs for inf (e.g. empty responses)."
        )

    def train_step(self) -> dict:
        """One optimisation step (``grad_accum`` micro-batches); returns its record."""
        cfg = self.cfg
        if self.frozen is not None and self.step % cfg.self_g_refresh == 0:
            self.frozen.load_state_dict(self.model.state_dict())
        self.model.train()
        idx_all = self.indices_for_step(self.step)
        self.opt.zero_grad(set_to_none=True)
        tot_loss, margins = 0.0, []
        for a in range(cfg.grad_accum):
            idx = idx_all[a * cfg.batch_size : (a + 1) * cfg.batch_size]
            loss, m = self.loss_on(idx)
            self._check_finite("loss", loss.detach(), idx, m)
            self._check_finite("labelled margin", m, idx)
            (loss / cfg.grad_accum).backward()
            tot_loss += loss.item() / cfg.grad_accum
            margins.append(m)
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self._check_finite("gradient norm", gnorm.detach(), idx_all)
        self.opt.step()
        self.sched.step()
        self.step += 1
        m = torch.cat(margins)
        rec = dataclasses.asdict(StepRecord(self.step, tot_loss, m.mean().item(), (m > 0).float().mean().item(),
                                            float(gnorm)))
        self.history.append(rec)
        return rec

    def train(self, resume: bool = True, stop_after: int | None = None) -> list[dict]:
        """Train to ``cfg.max_steps`` (resuming from ``out_dir/checkpoint.pt`` if present and ``resume``).

        ``stop_after``: stop after this many steps in this call (to simulate an interruption in tests).
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        ck = self.checkpoint_path
        if resume and ck is not None and ck.exists():
            self.load_checkpoint(ck)
        done_here = 0
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=cfg.method, disable=not cfg.progress, mininterval=2)
        while self.step < cfg.max_steps:
            if stop_after is not None and done_here >= stop_after:
                break
            rec = self.train_step()
            done_here += 1
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.2f}", refresh=False)
            if ck is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint(ck)
        bar.close()
        if ck is not None and self.step >= cfg.max_steps:
            self.save_checkpoint(ck)
        self.model.eval()
        return self.history
