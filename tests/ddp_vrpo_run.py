"""One small VRPOTrainer run, for tests/test_trainer_ddp.py: ``python ddp_vrpo_run.py OUT PER_DEVICE``
alone or under ``torchrun --nproc_per_node 2`` (gloo on CPU). Writes the final trainable parameters
(safetensors) and the log history (JSON) from rank 0."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GLOBAL_BATCH, STEPS, N_ROWS, VOCAB = 8, 4, 32, 64


def data():
    import numpy as np

    rng = np.random.default_rng(0)
    ids = lambda lo, hi: rng.integers(1, VOCAB, rng.integers(lo, hi)).tolist()  # noqa: E731
    return {"prompt_ids": [ids(3, 9) for _ in range(N_ROWS)], "chosen_ids": [ids(1, 5) for _ in range(N_ROWS)],
            "rejected_ids": [ids(1, 5) for _ in range(N_ROWS)],
            "a_1_ids": [[ids(1, 5), ids(1, 5)] for _ in range(N_ROWS)],
            "a_2_ids": [[ids(1, 5), ids(1, 5)] for _ in range(N_ROWS)],
            "g": rng.uniform(0.2, 1, N_ROWS).tolist(), "g_aux": rng.uniform(0, 1, (N_ROWS, 2)).tolist()}


def tiny_start():
    """The initial parameters of the run's model (a seeded random GPT-2)."""
    from llm.tiny_lm import tiny_gpt2

    model = tiny_gpt2(VOCAB, n_layer=2, n_embd=32, n_head=2, n_positions=32, eos_token_id=0, seed=0)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def run(out: str, per_device: int, lora=None, callbacks=(), resume=False, **kw):
    import torch
    from safetensors.torch import save_file
    from transformers import PrinterCallback

    from llm.tiny_lm import word_tokenizer
    from llm.tiny_lm import tiny_gpt2
    from llm.vrpo_trainer import VRPOConfig, VRPOTrainer

    torch.set_num_threads(1)
    cfg = dict(output_dir=out, lam="auto", lam_auto_decay=1.0, per_device_train_batch_size=per_device,
               max_steps=STEPS, learning_rate=3e-3, logging_steps=1, report_to=[], use_cpu=True, bf16=False,
               save_strategy="no", disable_tqdm=True, precompute_ref_log_probs=True, seed=0,
               ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)
    model = tiny_gpt2(VOCAB, n_layer=2, n_embd=32, n_head=2, n_positions=32, eos_token_id=0, seed=0)
    tr = VRPOTrainer(model, args=VRPOConfig(**{**cfg, **kw}), train_dataset=data(),
                     processing_class=word_tokenizer(VOCAB), peft_config=lora, callbacks=list(callbacks))
    tr.remove_callback(PrinterCallback)
    tr.train(resume_from_checkpoint=resume or None)
    if tr.accelerator.is_main_process:
        params = {k: v.detach().contiguous() for k, v in tr.model.named_parameters()}
        save_file(params, os.path.join(out, "params.safetensors"))
        with open(os.path.join(out, "log.json"), "w") as f:
            json.dump({"log": tr.state.log_history, "world": tr.accelerator.num_processes,
                       "ref_logps": tr.train_dataset["ref_logps"][:]}, f)
    return tr


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]))
