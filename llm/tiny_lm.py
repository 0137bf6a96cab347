"""A small GPT-2-style causal LM trained from scratch on HH text (offline stand-in for Pythia/Qwen).

:func:`train_bpe_tokenizer` (byte-level BPE, ``<|endoftext|>`` as EOS and pad), :func:`word_tokenizer`
(one token per word ``w<i>``: benchmarks, tests), :func:`tiny_gpt2` (random GPT-2, dropout off),
:func:`sft` (next-token training with ``trl.SFTTrainer``; the result is ``pi_ref``).
"""

from __future__ import annotations

import tempfile
from typing import Sequence

import torch

__all__ = ["EOS", "train_bpe_tokenizer", "word_tokenizer", "tiny_gpt2", "encode_pair_texts", "sft"]

EOS = "<|endoftext|>"


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int = 4096):
    """Byte-level BPE on ``texts`` (deterministic); returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=EOS)


def word_tokenizer(vocab: int):
    """Word-level tokenizer ``w0 .. w{vocab-2}`` plus ``<|endoftext|>`` (id 0, = pad): one word, one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({EOS: 0, **{f"w{i}": i + 1 for i in range(vocab - 1)}}, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


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


def sft(model, tokenizer, sequences: Sequence[list[int]], steps: int, batch_size: int, lr: float, seed: int,
        warmup: int = 20, progress: bool = True) -> list[float]:
    """Next-token cross-entropy on ``sequences`` (lists of ids) with ``trl.SFTTrainer``: AdamW
    (betas 0.9/0.95, weight decay 0.01), linear warm-up then cosine decay, gradient clipping at 1.
    Returns the per-step training losses."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="sft-"), max_steps=steps, per_device_train_batch_size=batch_size,
                     learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=warmup, weight_decay=0.01,
                     adam_beta2=0.95, max_grad_norm=1.0, seed=seed, logging_steps=1, save_strategy="no", report_to=[],
                     gradient_checkpointing=False, bf16=False, use_cpu=not torch.cuda.is_available(),
                     disable_tqdm=not progress, max_length=None, dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": list(sequences)}),
                         processing_class=tokenizer)
    if not progress:
        trainer.remove_callback(PrinterCallback)
    trainer.train()
    model.eval()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]
