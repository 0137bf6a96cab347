"""DPO/VRPO trainer: resume, checkpoints, NaN guard, accumulation, bf16, ref-log-prob cache, learning."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from llm.tiny_lm import tiny_gpt2, train_bpe_tokenizer  # noqa: E402
from llm.trainer import (  # noqa: E402
    NonFiniteError,
    PreferenceData,
    TrainerConfig,
    VRPOTrainer,
    build_preference_data,
    compute_ref_logps,
)

# bf16 keeps ~3 significant digits; the loss is a mean of O(1) terms
BF16_LOSS_ATOL = 2e-2


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat dog ran in park hello hi yes no good bad help me please thanks".split()
    sent = lambda k: " ".join(rng.choice(words, k))  # noqa: E731
    n = 24
    df = pd.DataFrame({
        "prompt": [f"Human: {sent(6)} Assistant:" for _ in range(n)],
        "chosen": [" good " + sent(3) for _ in range(n)],  # a learnable preference: "good" wins
        "rejected": [" bad " + sent(3) for _ in range(n)],
        "a_1": [" " + sent(4) for _ in range(n)],
        "a_2": [" " + sent(4) for _ in range(n)],
    })
    df["chosen_preference"] = rng.uniform(0.5, 1.0, n)
    df["rejected_preference"] = 1 - df["chosen_preference"]
    df["a_1_preference"] = rng.uniform(0, 1, n)
    df["a_2_preference"] = 1 - df["a_1_preference"]
    tok = train_bpe_tokenizer(pd.concat([df.prompt, df.chosen, df.rejected]).tolist(), vocab_size=300)
    return tok, build_preference_data(tok, df, 24, 12)


def _new(tok, data, seed=0, **kw):
    model = tiny_gpt2(len(tok), n_layer=2, n_embd=32, n_head=2, n_positions=64, eos_token_id=tok.eos_token_id,
                      seed=seed)
    kw = {"batch_size": 4, "max_steps": 6, "lr": 3e-3, "warmup_steps": 2, "progress": False, **kw}
    return VRPOTrainer(model, data, TrainerConfig(**kw), pad_id=tok.pad_token_id)


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("g_source", ["columns", "self"])
def test_resume_gives_identical_continuation(toy, tmp_path, g_source):
    tok, data = toy
    straight = _new(tok, data, lam=1.0, g_source=g_source, self_g_refresh=2, max_steps=6)
    straight.train()
    out = tmp_path / g_source
    first = _new(tok, data, lam=1.0, g_source=g_source, self_g_refresh=2, max_steps=6, out_dir=str(out),
                 checkpoint_every=3)
    first.train(stop_after=3)  # "interrupted" after the step-3 checkpoint
    assert first.step == 3 and (out / "checkpoint.pt").exists()
    resumed = _new(tok, data, seed=123, lam=1.0, g_source=g_source, self_g_refresh=2, max_steps=6,
                   out_dir=str(out), checkpoint_every=3)  # different init: everything must come from the checkpoint
    resumed.train()
    assert resumed.step == 6
    assert torch.equal(_params(resumed.model), _params(straight.model))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]


def test_checkpoint_carries_resolved_config_and_is_written_atomically(toy, tmp_path):
    tok, data = toy
    tr = _new(tok, data, lam=0.0, out_dir=str(tmp_path), max_steps=2)
    tr.extra_config = {"experiment": {"seed": 7, "data": "toy"}}
    tr.train()
    blob = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert blob["config"]["method"] == "dpo"
    assert blob["config"]["trainer"]["lam"] == 0.0 and blob["config"]["trainer"]["max_steps"] == 2
    assert blob["config"]["experiment"] == {"seed": 7, "data": "toy"}
    assert blob["step"] == 2 and len(blob["history"]) == 2
    assert not list(tmp_path.glob("*.tmp"))
    # a checkpoint written with other settings is refused rather than silently mixed
    other = _new(tok, data, lam=0.0, beta=0.5, out_dir=str(tmp_path), max_steps=3)
    with pytest.raises(ValueError, match="different settings"):
        other.train()


def test_nan_guard_stops_with_clear_message(toy):
    tok, data = toy
    tr = _new(tok, data, lam=1.0)
    with torch.no_grad():
        tr.model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    before = _params(tr.model).clone()
    with pytest.raises(NonFiniteError, match=r"vrpo step 0: loss is not finite.*lower lr"):
        tr.train_step()
    assert torch.equal(_params(tr.model).isnan(), before.isnan())  # no optimizer step was taken
    tr2 = _new(tok, data, lam=0.0)
    tr2.ref_logps[tr2.indices_for_step(0)[0], 0] = float("-inf")  # a broken reference log-prob in batch 0
    with pytest.raises(NonFiniteError, match="dpo step 0: loss is not finite"):
        tr2.train_step()


def test_gradient_accumulation_equals_large_batch(toy):
    tok, data = toy
    a = _new(tok, data, lam=1.0, batch_size=8, grad_accum=1, max_steps=1)
    b = _new(tok, data, lam=1.0, batch_size=4, grad_accum=2, max_steps=1)
    assert a.indices_for_step(0) == b.indices_for_step(0)
    ra, rb = a.train_step(), b.train_step()
    assert abs(ra["loss"] - rb["loss"]) < 1e-5
    assert abs(ra["grad_norm"] - rb["grad_norm"]) < 1e-4 * ra["grad_norm"]
    torch.testing.assert_close(_params(a.model), _params(b.model), atol=1e-5, rtol=0)


def test_bf16_autocast_matches_fp32(toy):
    tok, data = toy
    f32 = _new(tok, data, lam=1.0, precision="fp32")
    b16 = _new(tok, data, lam=1.0, precision="bf16")
    with torch.no_grad():
        for t in (f32, b16):
            torch.manual_seed(1)
            for p in t.model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        l32, _ = f32.loss_on(list(range(8)))
        l16, _ = b16.loss_on(list(range(8)))
    assert torch.isfinite(l16) and abs(l32.item() - l16.item()) < BF16_LOSS_ATOL


def test_ref_logps_cached_and_reused(toy, tmp_path, monkeypatch):
    tok, data = toy
    model = tiny_gpt2(len(tok), n_layer=2, n_embd=32, n_head=2, n_positions=64, eos_token_id=tok.eos_token_id)
    path = tmp_path / "ref.pt"
    first = compute_ref_logps(model, data, 4, tok.pad_token_id, cache_path=path, progress=False)
    assert first.shape == (len(data), 4) and torch.isfinite(first).all()
    import llm.trainer as T

    def boom(*a, **k):
        raise AssertionError("recomputed instead of reading the cache")

    monkeypatch.setattr(T, "sequence_logps", boom)
    assert torch.equal(compute_ref_logps(model, data, 4, tok.pad_token_id, cache_path=path, progress=False), first)
    # another model (different fingerprint) does not reuse it
    other = tiny_gpt2(len(tok), n_layer=2, n_embd=32, n_head=2, n_positions=64, eos_token_id=tok.eos_token_id, seed=9)
    with pytest.raises(AssertionError, match="recomputed"):
        compute_ref_logps(other, data, 4, tok.pad_token_id, cache_path=path, progress=False)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_training_learns_the_preference(toy, lam):
    """DPO and VRPO move the implicit reward towards the labels: margin accuracy on the
    training pairs goes from 0.5-ish (pi = pi_ref gives margin 0) to > 0.9."""
    tok, data = toy
    tr = _new(tok, data, lam=lam, beta=0.5, max_steps=30, lr=3e-3)
    tr.train()
    with torch.no_grad():
        _, m = tr.loss_on(list(range(len(data))))
    assert (m > 0).float().mean().item() > 0.9
    assert tr.history[-1]["loss"] < tr.history[0]["loss"]


def test_config_validation():
    with pytest.raises(ValueError, match="g_source"):
        TrainerConfig(g_source="oracle")
    with pytest.raises(ValueError, match="beta"):
        TrainerConfig(beta=0)
    with pytest.raises(ValueError, match="precision"):
        TrainerConfig(precision="fp8")
    assert TrainerConfig(lam=0).method == "dpo" and TrainerConfig(lam=0).K == 2


def test_vrpo_needs_aux_pairs(toy):
    tok, data = toy
    bare = PreferenceData(data.prompt_ids, [r[:2] for r in data.response_ids], data.Z, data.g, data.g_aux)
    with pytest.raises(ValueError, match="extra pair"):
        _new(tok, bare, lam=1.0)
    _new(tok, bare, lam=0.0)  # DPO does not


def test_real_checkpoint_path_from_pretrained(toy, tmp_path):
    """The Pythia/Qwen path: AutoModelForCausalLM/AutoTokenizer.from_pretrained on a saved (tiny) checkpoint,
    then a VRPO step; a tokenizer without a pad token gets pad = EOS."""
    from llm.tiny_lm import load_causal_lm

    tok, data = toy
    model = tiny_gpt2(len(tok), n_layer=2, n_embd=32, n_head=2, n_positions=64, eos_token_id=tok.eos_token_id)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_causal_lm(str(tmp_path), dtype="float32")
    assert tok2.pad_token_id == tok.pad_token_id
    assert torch.equal(_params(loaded), _params(model))
    tr = VRPOTrainer(loaded, data, TrainerConfig(lam=1.0, batch_size=4, max_steps=1, progress=False),
                     pad_id=tok2.pad_token_id)
    rec = tr.train_step()
    assert np.isfinite(rec["loss"]) and rec["grad_norm"] > 0
