"""Extra responses ``a_1, a_2 ~ pi_ref(.|x)`` for every training prompt, generated once and cached
(JSON keyed by the sampling settings, a ``pi_ref`` fingerprint and the prompts: reruns reuse the
samples, a changed ``pi_ref`` or setting regenerates them)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from vrpo_common.fileio import write_json

from .vrpo_loss import left_pad

__all__ = ["SamplingConfig", "sample_responses", "aux_responses", "model_fingerprint"]


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


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled from ``pi_ref`` (validated)."""

    temperature: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 48
    max_prompt_tokens: int = 192
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self):
        if not (self.temperature > 0 and min(self.max_new_tokens, self.max_prompt_tokens, self.batch_size) >= 1
                and self.top_k >= 0):
            raise ValueError(f"sampling needs temperature > 0, max_new_tokens, max_prompt_tokens, batch_size >= 1 "
                             f"and top_k >= 0; got {self}")


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: Sequence[str], n: int, cfg: SamplingConfig,
                     progress: bool = True, desc: str = "sampling") -> list[list[str]]:
    """``n`` sampled continuations (decoded text, cut at EOS, one leading space dropped) per prompt; ``out[i][k]``.

    Prompts are left-truncated to ``cfg.max_prompt_tokens`` and left-padded. Batch ``b``
    is sampled under ``torch.manual_seed(cfg.seed + b)``, so the samples depend only on
    the seed, the model and the prompts (not on earlier calls).
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = [x[-cfg.max_prompt_tokens:] for x in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    rows = [(i, k) for i in range(len(prompts)) for k in range(n)]
    out: list[list[str]] = [[""] * n for _ in prompts]
    for b, s in enumerate(tqdm(range(0, len(rows), cfg.batch_size), desc=desc, disable=not progress, mininterval=2)):
        chunk = rows[s : s + cfg.batch_size]
        x, mask = left_pad([ids[i] for i, _ in chunk], pad)  # (rows, T)
        T = x.shape[1]
        torch.manual_seed(cfg.seed + b)
        gen = model.generate(
            input_ids=x.to(device), attention_mask=mask.to(device), do_sample=True, temperature=cfg.temperature,
            top_k=cfg.top_k or None, max_new_tokens=cfg.max_new_tokens, pad_token_id=pad, eos_token_id=eos,
        )[:, T:]  # (rows, <= max_new_tokens)
        for j, (i, k) in enumerate(chunk):
            toks = gen[j].tolist()
            if eos in toks:
                toks = toks[: toks.index(eos)]
            text = tokenizer.decode(toks, skip_special_tokens=True)
            out[i][k] = text[1:] if text.startswith(" ") else text
    model.train(was_training)
    return out


def _key(model, prompts: Sequence[str], n: int, cfg: SamplingConfig) -> str:
    blob = json.dumps({"model": model_fingerprint(model), "n": n, "cfg": asdict(cfg), "prompts": list(prompts)})
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def aux_responses(model, tokenizer, prompts: Sequence[str], cfg: SamplingConfig, cache_dir: str | os.PathLike,
                  progress: bool = True) -> tuple[list[str], list[str]]:
    """``(a_1, a_2)`` lists, one pair per prompt, sampled from ``model`` (= ``pi_ref``) or read from the cache.

    Responses follow the data convention of :mod:`llm.data` (``prompt + " " + response``
    is the transcript): one leading space of the decoded continuation is dropped.
    """
    path = Path(cache_dir) / f"aux-{_key(model, prompts, 2, cfg)}.json"
    if path.exists():
        blob = json.loads(path.read_text())
        return blob["a_1"], blob["a_2"]
    pairs = sample_responses(model, tokenizer, prompts, 2, cfg, progress=progress, desc="a_1, a_2 ~ pi_ref")
    blob = {"config": asdict(cfg), "n_prompts": len(prompts), "a_1": [p[0] for p in pairs], "a_2": [p[1] for p in pairs]}
    write_json(path, blob)
    return blob["a_1"], blob["a_2"]
