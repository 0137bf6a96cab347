"""DPO/VRPO loss on a causal LM: log-prob paths, limiting cases, TRL equality, g paths."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch.nn.functional as F  # noqa: E402

from llm.tiny_lm import tiny_gpt2, train_bpe_tokenizer  # noqa: E402
from llm.trainer import TrainerConfig, VRPOTrainer, build_preference_data  # noqa: E402
from llm.vrpo_loss import (  # noqa: E402
    collate,
    dpo_margins,
    sequence_logps_naive,
    sequence_logps_shared_prompt,
    vrpo_objective,
)
from vrpo.loss import logistic_loss  # noqa: E402

# fp32 sums of ~20 token log-probs through two attention layouts (padded, cached):
# rounding differences are ~1e-6 per token.
FP32_LOGP_ATOL = 1e-4
FP32_GRAD_RTOL = 1e-4
# bf16 autocast (8-bit mantissa, fp32 log-softmax and sums): relative error ~2^-8 of the summed log-prob
BF16_LOGP_RTOL = 2 ** -7
VOCAB = 97
PAD = 0


def _model(seed=0, n_layer=2, n_embd=32):
    return tiny_gpt2(VOCAB, n_layer=n_layer, n_embd=n_embd, n_head=4, n_positions=128, eos_token_id=PAD, seed=seed)


def _random_batch(B=3, K=4, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, VOCAB, rng.integers(3, 15)).tolist() for _ in range(B)]
    responses = [[rng.integers(1, VOCAB, rng.integers(1, 8)).tolist() for _ in range(K)] for _ in range(B)]
    return collate(prompts, responses)


def _one_at_a_time(model, batch):
    """Unpadded, uncached reference: each prompt+response alone."""
    out = torch.zeros(batch.B, batch.K)
    for i, (p, rs) in enumerate(zip(batch.prompts, batch.responses)):
        for k, r in enumerate(rs):
            x = torch.tensor([p + r])
            lp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
            out[i, k] = lp.gather(-1, x[0, 1:, None])[:, 0][-len(r):].sum()
    return out


def test_naive_and_shared_prompt_logps_match_one_at_a_time():
    model = _model().eval()
    batch = _random_batch()
    with torch.no_grad():
        ref = _one_at_a_time(model, batch)
        naive = sequence_logps_naive(model, batch, PAD)
        shared = sequence_logps_shared_prompt(model, batch, PAD)
    assert naive.shape == (3, 4)
    torch.testing.assert_close(naive, ref, atol=FP32_LOGP_ATOL, rtol=0)
    torch.testing.assert_close(shared, ref, atol=FP32_LOGP_ATOL, rtol=0)


def test_paths_agree_under_bf16_autocast():
    model = _model().eval()
    batch = _random_batch(B=4, K=4, seed=3)
    with torch.no_grad():
        f32 = sequence_logps_naive(model, batch, PAD)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            naive = sequence_logps_naive(model, batch, PAD)
            shared = sequence_logps_shared_prompt(model, batch, PAD)
    tol = BF16_LOGP_RTOL * f32.abs().max().item()
    torch.testing.assert_close(naive, f32, atol=tol, rtol=0)
    torch.testing.assert_close(shared, f32, atol=tol, rtol=0)
    torch.testing.assert_close(shared, naive, atol=tol, rtol=0)


def test_shared_prompt_gradient_equals_naive_gradient():
    """Gradients flow through the repeated prompt KV cache: same loss, same gradient."""
    batch = _random_batch(B=4, K=4, seed=1)
    ref = torch.randn(4, 4)
    grads, losses = [], []
    for fn in (sequence_logps_naive, sequence_logps_shared_prompt):
        model = _model(seed=3)
        loss = vrpo_objective(fn(model, batch, PAD), ref, beta=0.5, lam=1.0,
                              g=torch.tensor([0.6, 0.7, 0.2, 0.9]), g_aux=torch.tensor([0.5, 0.1, 0.8, 0.4]))
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=0)
    # the prompt-only parameters (position embeddings of prompt positions) receive gradient in both paths
    assert grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=FP32_GRAD_RTOL, atol=1e-6)


def test_lam_zero_is_dpo_exactly():
    g = torch.Generator().manual_seed(0)
    logps, ref = torch.randn(16, 4, generator=g) * 5, torch.randn(16, 4, generator=g) * 5
    beta = 0.1
    dpo = (-F.logsigmoid(beta * ((logps[:, 0] - ref[:, 0]) - (logps[:, 1] - ref[:, 1])))).mean()
    assert torch.equal(vrpo_objective(logps, ref, beta, lam=0.0), dpo)
    # g and the extra pair are ignored at lam = 0, and a (B, 2) input suffices
    assert torch.equal(vrpo_objective(logps[:, :2], ref[:, :2], beta, lam=0), dpo)


def test_vrpo_objective_matches_formula_and_logistic_identity():
    g_ = torch.Generator().manual_seed(1)
    logps, ref = torch.randn(32, 4, generator=g_), torch.randn(32, 4, generator=g_)
    g, g_aux = torch.rand(32, generator=g_), torch.rand(32, generator=g_)
    beta, lam = 0.7, 0.6
    d = dpo_margins(logps, ref, beta)
    assert d.shape == (32, 2)
    by_formula = (-F.logsigmoid(d[:, 0])).mean() - lam * logistic_loss(d[:, 0], g).mean() \
        + lam * logistic_loss(d[:, 1], g_aux).mean()
    torch.testing.assert_close(vrpo_objective(logps, ref, beta, lam, g=g, g_aux=g_aux), by_formula)
    # METHOD.md s2: l(delta, Z) - l(delta, g) = -(Z - g) delta (here Z = 1)
    torch.testing.assert_close(logistic_loss(d[:, 0], torch.ones(32)) - logistic_loss(d[:, 0], g),
                               -(1 - g) * d[:, 0], atol=1e-6, rtol=0)
    # g equal to the label cancels the labelled term: only lam * l(delta_aux, g_aux) is left
    torch.testing.assert_close(vrpo_objective(logps, ref, beta, lam, g=torch.ones(32), g_aux=g_aux),
                               (1 - lam) * (-F.logsigmoid(d[:, 0])).mean() + lam * logistic_loss(d[:, 1], g_aux).mean())
    with pytest.raises(ValueError, match="extra pair"):
        vrpo_objective(logps[:, :2], ref[:, :2], beta, lam=1.0, g=g, g_aux=g_aux)


def _trl_sigmoid_formula(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """TRL DPOTrainer sigmoid loss, transcribed from trl/trainer/dpo_trainer.py (v1.16, ``_compute_loss``,
    reverse-KL, no label smoothing): ``-F.logsigmoid(beta * (chosen_logratios - rejected_logratios)).mean()``."""
    delta = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    return (-F.logsigmoid(beta * delta)).mean()


def test_dpo_equals_transcribed_trl_sigmoid_loss():
    g_ = torch.Generator().manual_seed(2)
    logps, ref = torch.randn(64, 2, generator=g_) * 20, torch.randn(64, 2, generator=g_) * 20
    for beta in (0.01, 0.1, 1.0):
        torch.testing.assert_close(vrpo_objective(logps, ref, beta, lam=0),
                                   _trl_sigmoid_formula(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta),
                                   atol=1e-6, rtol=0)


def test_dpo_equals_trl_dpotrainer_on_identical_inputs(tmp_path):
    """Our DPO loss (log-probs and loss) equals TRL's DPOTrainer sigmoid loss on the same model, reference
    model and tokenized pairs (TRL is a test-only dependency)."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from trl import DPOConfig, DPOTrainer

    tok = train_bpe_tokenizer(["hello world, this is a small test of tokenizers for a DPO check."] * 20,
                              vocab_size=300)
    mk = lambda s: tiny_gpt2(len(tok), n_layer=2, n_embd=32, n_head=2, n_positions=64,  # noqa: E731
                             eos_token_id=tok.eos_token_id, seed=s)
    policy, ref_model = mk(0), mk(1)
    ds = datasets.Dataset.from_dict({
        "prompt": ["hello world", "this is a small", "a test of", "tokenizers for a DPO"],
        "chosen": [" this is", " test of tokenizers", " hello", " check."],
        "rejected": [" a test", " world", " small test of a DPO check", " is"],
    })
    beta = 0.3
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], beta=beta, per_device_train_batch_size=4, use_cpu=True,
                     loss_type=["sigmoid"])
    trainer = DPOTrainer(model=policy, ref_model=ref_model, args=args, train_dataset=ds, processing_class=tok)
    rows = [trainer.train_dataset[i] for i in range(4)]
    trl_loss = trainer._compute_loss(trainer.model, trainer.data_collator(rows), return_outputs=False)

    batch = collate([r["prompt_ids"] for r in rows], [[r["chosen_ids"], r["rejected_ids"]] for r in rows])
    with torch.no_grad():
        ours = vrpo_objective(sequence_logps_shared_prompt(policy, batch, tok.pad_token_id),
                              sequence_logps_naive(ref_model, batch, tok.pad_token_id), beta, lam=0)
    assert abs(trl_loss.item() - ours.item()) < 1e-5, (trl_loss.item(), ours.item())


# ---------------------------------------------------------------------- g paths


@pytest.fixture(scope="module")
def toy_text():
    tok = train_bpe_tokenizer(["the cat sat on the mat", "a dog ran in the park", "Human: hi Assistant: hello"] * 30,
                              vocab_size=280)
    df = pd.DataFrame({
        "prompt": ["Human: hi Assistant:", "Human: the cat Assistant:", "Human: a dog Assistant:",
                   "Human: park Assistant:"],
        "chosen": [" hello", " sat on the mat", " ran", " a dog ran"],
        "rejected": [" the cat", " a dog", " in the park", " hi"],
        "a_1": [" mat", " cat sat", " the", " hello"],
        "a_2": [" park", " on", " dog ran in", " Human"],
        "chosen_preference": [0.9, 0.6, 0.3, 0.8],
        "rejected_preference": [0.1, 0.4, 0.7, 0.2],
        "a_1_preference": [0.5, 0.2, 0.6, 0.9],
        "a_2_preference": [0.5, 0.6, 0.2, 0.1],
    })
    return tok, df


def _trainer(tok, data, **kw):
    model = tiny_gpt2(len(tok), n_layer=2, n_embd=32, n_head=2, n_positions=64, eos_token_id=tok.eos_token_id, seed=0)
    cfg = TrainerConfig(batch_size=4, max_steps=3, progress=False, **kw)
    return VRPOTrainer(model, data, cfg, pad_id=tok.pad_token_id)


def test_g_from_columns(toy_text):
    tok, df = toy_text
    data = build_preference_data(tok, df, 32, 16)
    np.testing.assert_allclose(data.g, [0.9, 0.6, 0.3, 0.8])
    np.testing.assert_allclose(data.g_aux, [0.5, 0.2 / 0.8, 0.6 / 0.8, 0.9])  # p1 / (p1 + p2)
    tr = _trainer(tok, data, lam=1.0, beta=0.5)
    # push the policy away from pi_ref so the margins are non-zero
    with torch.no_grad():
        for p in tr.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss, _ = tr.loss_on([0, 1, 2, 3])
    with torch.no_grad():
        logps = sequence_logps_naive(tr.model, data.batch([0, 1, 2, 3], 4), tok.pad_token_id)
    d = dpo_margins(logps, tr.ref_logps, 0.5)
    g, ga = torch.tensor(data.g, dtype=torch.float32), torch.tensor(data.g_aux, dtype=torch.float32)
    expected = (-F.logsigmoid(d[:, 0])).mean() - logistic_loss(d[:, 0], g).mean() + logistic_loss(d[:, 1], ga).mean()
    assert abs(loss.item() - expected.item()) < 1e-5
    assert abs(expected.item() - (-F.logsigmoid(d[:, 0])).mean().item()) > 1e-3  # VRPO != DPO here


def test_g_from_preference_model_and_constant(toy_text):
    tok, df = toy_text
    reward = {r: float(len(r)) for r in pd.concat([df.chosen, df.rejected, df.a_1, df.a_2])}

    def g_model(prompts, a, b):  # a "reward model": longer is better, BT link
        return 1 / (1 + np.exp(-(np.array([reward[x] for x in a]) - np.array([reward[x] for x in b]))))

    data = build_preference_data(tok, df.drop(columns=[c for c in df if c.endswith("_preference")]), 32, 16,
                                 g_model=g_model)
    np.testing.assert_allclose(data.g[0], 1 / (1 + np.exp(-(6 - 8))))
    np.testing.assert_allclose(data.g_aux[2], 1 / (1 + np.exp(-(4 - 11))))
    tr = _trainer(tok, data, lam=1.0)
    tr_c = _trainer(tok, data, lam=1.0, g_source="constant")
    with torch.no_grad():
        for t in (tr, tr_c):
            torch.manual_seed(5)
            for p in t.model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        l_model, m = tr.loss_on([0, 1, 2, 3])
        l_const, m2 = tr_c.loss_on([0, 1, 2, 3])
        logps = sequence_logps_naive(tr.model, data.batch([0, 1, 2, 3], 4), tok.pad_token_id)
    d = dpo_margins(logps, tr.ref_logps, tr.cfg.beta)
    # the loss depends on g only through -lam (l(delta, g) - l(delta_aux, g_aux)): linear in g
    diff = (-(logistic_loss(d[:, 0], torch.tensor(data.g).float()) - logistic_loss(d[:, 0], torch.full((4,), .5)))
            + logistic_loss(d[:, 1], torch.tensor(data.g_aux).float()) - logistic_loss(d[:, 1], torch.full((4,), .5)))
    assert abs((l_model - l_const).item() - diff.mean().item()) < 1e-5
    assert abs(diff.mean().item()) > 1e-5


def test_g_self_is_frozen_policy_preference_refreshed_every_k(toy_text):
    tok, df = toy_text
    data = build_preference_data(tok, df[["prompt", "chosen", "rejected", "a_1", "a_2"]], 32, 16)
    tr = _trainer(tok, data, lam=1.0, g_source="self", self_g_refresh=2, lr=1e-2, warmup_steps=0, beta=1.0)
    tr.train_step()  # refresh at step 0, then one update
    idx = [0, 1, 2, 3]
    with torch.no_grad():
        frozen = sequence_logps_naive(tr.frozen, data.batch(idx, 4), tok.pad_token_id)
        now = sequence_logps_naive(tr.model, data.batch(idx, 4), tok.pad_token_id)
    d_frozen, d_now = dpo_margins(frozen, tr.ref_logps, 1.0), dpo_margins(now, tr.ref_logps, 1.0)
    assert (d_frozen - d_now).abs().max() > 1e-4  # the policy moved, the frozen copy did not
    loss, _ = tr.loss_on(idx)
    gs = torch.sigmoid(d_frozen)
    expected = (-F.logsigmoid(d_now[:, 0])).mean() - logistic_loss(d_now[:, 0], gs[:, 0]).mean() \
        + logistic_loss(d_now[:, 1], gs[:, 1]).mean()
    assert abs(loss.item() - expected.item()) < 1e-5
    after_refresh = [v.clone() for v in tr.frozen.state_dict().values()]
    tr.train_step()  # step 1: no refresh
    assert all(torch.equal(a, b) for a, b in zip(after_refresh, tr.frozen.state_dict().values()))
    policy_before_step2 = [v.clone() for v in tr.model.state_dict().values()]
    tr.train_step()  # step 2: refresh to the current policy, then update
    assert all(torch.equal(a, b) for a, b in zip(policy_before_step2, tr.frozen.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(after_refresh, tr.frozen.state_dict().values()))
