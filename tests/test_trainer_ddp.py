"""Scale-out on existing engines (issue 11 item 6), on the CI's CPU: a 2-process gloo data-parallel
VRPOTrainer run equals the 1-process run with the same global batch, and a PEFT LoRA run trains
only the adapter, keeps pi_ref as the adapter-free model, and resumes exactly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ddp_vrpo_run as R  # noqa: E402

# Two processes average their half-batch gradients (all-reduce) where one process averages the
# whole batch, and each precomputes the reference log-probs of its half: fp32 round-off of ~1e-7
# relative, which 4 AdamW steps at lr 3e-3 leave well below 1e-5.
DDP_PARAM_ATOL = 1e-5
DDP_LOSS_ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tests/conftest.py


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_data_parallel_equals_one_process(tmp_path):
    from safetensors.torch import load_file

    one = R.run(str(tmp_path / "one"), per_device=R.GLOBAL_BATCH)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(HERE / "ddp_vrpo_run.py"), str(tmp_path / "two"), str(R.GLOBAL_BATCH // 2)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    two = json.loads((tmp_path / "two" / "log.json").read_text())
    assert two["world"] == 2
    np.testing.assert_allclose(two["ref_logps"], one.train_dataset["ref_logps"], atol=1e-5)  # sharded precompute
    p1 = {k: v.detach() for k, v in one.model.named_parameters()}
    p2 = load_file(str(tmp_path / "two" / "params.safetensors"))
    assert p1.keys() == p2.keys()
    worst = max((p1[k] - p2[k]).abs().max().item() for k in p1)
    moved = max((p1[k] - v).abs().max().item() for k, v in R.tiny_start().items())
    print(f"max |param diff| 2 vs 1 process: {worst:.2e} (largest parameter move {moved:.2e})")
    assert worst < DDP_PARAM_ATOL < moved / 100, (worst, moved)
    log1 = [h for h in one.state.log_history if "loss" in h]
    log2 = [h for h in two["log"] if "loss" in h]
    np.testing.assert_allclose([h["loss"] for h in log2], [h["loss"] for h in log1], atol=DDP_LOSS_ATOL)
    lam1, lam2 = [h["lam"] for h in log1], [h["lam"] for h in log2]  # power tuning sees both halves
    np.testing.assert_allclose(lam2, lam1, atol=1e-6)
    assert lam1[0] == 0 and 0 < lam1[-1] <= 1


def test_lora_trains_only_the_adapter_and_resumes(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = state.global_step >= 2

    def lora():
        return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True)

    run = dict(save_strategy="steps", save_steps=2)
    base = R.tiny_start()
    straight = R.run(str(tmp_path / "a"), per_device=4, lora=lora(), **run)
    named = dict(straight.model.named_parameters())
    trained = {k for k, p in named.items() if p.requires_grad}
    assert trained and all("lora_" in k for k in trained)
    for k, p in named.items():  # the base weights did not move, the adapter did
        if "lora_" not in k:
            assert torch.equal(p.detach(), base[k.replace("base_model.model.", "").replace(".base_layer", "")])
    assert max(named[k].detach().abs().max().item() for k in trained if "lora_B" in k) > 0
    # pi_ref is the adapter-free model: the precomputed reference log-probs are the base model's
    plain = R.run(str(tmp_path / "plain"), per_device=4, max_steps=1)
    np.testing.assert_allclose(straight.train_dataset["ref_logps"], plain.train_dataset["ref_logps"], atol=1e-5)
    first = R.run(str(tmp_path / "b"), per_device=4, lora=lora(), callbacks=[StopAt()], **run)
    assert first.state.global_step == 2 and (tmp_path / "b" / "checkpoint-2" / "adapter_model.safetensors").exists()
    resumed = R.run(str(tmp_path / "b"), per_device=4, lora=lora(), resume=True, **run)
    assert resumed.state.global_step == R.STEPS
    for k, p in dict(resumed.model.named_parameters()).items():
        assert torch.equal(p.detach(), named[k].detach()), k
