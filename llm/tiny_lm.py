"""A small GPT-2-style causal LM trained from scratch on HH text (offline stand-in for Pythia/Qwen).

- :func:`train_bpe_tokenizer`: byte-level BPE (``tokenizers``) trained on the given texts,
  wrapped as a ``transformers`` fast tokenizer with ``<|endoftext|>`` as EOS and pad.
- :func:`tiny_gpt2`: a randomly initialised ``GPT2LMHeadModel`` (dropout off, as DPO wants).
- :func:`sft`: next-token training on ``prompt + response`` token ids; the result is ``pi_ref``.
- :func:`load_causal_lm`: the real path, ``AutoModelForCausalLM.from_pretrained`` by name or path.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from vrpo_common.fileio import atomic_path

__all__ = ["EOS", "train_bpe_tokenizer", "tiny_gpt2", "load_causal_lm", "encode_pair_texts", "sft", "atomic_save"]

EOS = "<|endoftext|>"


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, then ``os.replace`` (never a half-written file)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int = 4096, save_dir: str | os.PathLike | None = None):
    """Byte-level BPE on ``texts``; returns a ``PreTrainedTokenizerFast`` (cached in ``save_dir`` if given)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if save_dir is not None and (Path(save_dir) / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(save_dir))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=EOS)
    if save_dir is not None:
        tmp = Path(tempfile.mkdtemp(dir=Path(save_dir).parent if Path(save_dir).parent.exists() else None))
        hf.save_pretrained(str(tmp))
        Path(save_dir).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, save_dir)
    return hf


def tiny_gpt2(vocab_size: int, n_layer: int = 4, n_embd: int = 128, n_head: int = 4, n_positions: int = 512,
              eos_token_id: int = 0, seed: int = 0):
    """Randomly initialised GPT-2 (dropout 0) from a seed."""
    from transformers import AutoModelForCausalLM, GPT2Config

    cfg = GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def load_causal_lm(name_or_path: str, dtype: str = "float32", device: str = "cpu"):
    """``AutoModelForCausalLM`` + tokenizer by hub name or local path (Pythia, Qwen, ...).

    Adds a pad token (= EOS) when the tokenizer has none. ``dtype`` in {float32, bfloat16, float16}.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=getattr(torch, dtype)).to(device)
    return model, tok


def encode_pair_texts(tokenizer, prompts: Sequence[str], responses: Sequence[Sequence[str]],
                      max_prompt_tokens: int, max_response_tokens: int):
    """Token ids for prompts (left-truncated: the last turns matter) and responses
    (right-truncated, EOS appended when it fits). Returns ``(prompt_ids, response_ids)``
    with ``response_ids[i][k]`` the ids of ``responses[i][k]``."""
    eos = tokenizer.eos_token_id
    p_ids = [ids[-max_prompt_tokens:] for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    flat = [r for rs in responses for r in rs]
    K = len(responses[0]) if len(responses) else 0
    r_flat = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    r_flat = [(ids + [eos])[:max_response_tokens] for ids in r_flat]
    r_ids = [r_flat[i * K : (i + 1) * K] for i in range(len(prompts))]
    return p_ids, r_ids


def sft(model, sequences: Sequence[list[int]], steps: int, batch_size: int, lr: float, seed: int,
        pad_id: int, warmup: int = 20, progress: bool = True, desc: str = "SFT"):
    """Next-token cross-entropy on ``sequences`` (each a list of ids), AdamW + cosine schedule.

    Sequences are drawn in seeded random order; returns the list of per-step losses.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses = []
    order = torch.randperm(len(sequences), generator=gen).tolist()
    ptr = 0
    for _ in tqdm(range(steps), desc=desc, disable=not progress, mininterval=2):
        idx = []
        while len(idx) < batch_size:
            if ptr == len(order):
                order, ptr = torch.randperm(len(sequences), generator=gen).tolist(), 0
            idx.append(order[ptr])
            ptr += 1
        seqs = [sequences[i] for i in idx]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), T), -100, dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.tensor(s)
            labels[j, : len(s)] = torch.tensor(s)
        mask = (labels != -100).long()
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"{desc}: non-finite loss {out.loss.item()} at step {len(losses)}; lower lr")
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(out.loss.item())
    model.eval()
    return losses
