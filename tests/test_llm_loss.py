"""DPO/VRPO loss on a causal LM (llm.vrpo_loss): log-prob paths, limiting cases, soft labels, formulas."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch.nn.functional as F  # noqa: E402

from llm.tiny_lm import tiny_gpt2  # noqa: E402
from llm.vrpo_loss import pad_batch, pair_margins, sequence_logps, soft_label, vrpo_loss  # noqa: E402
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


def _ids(B=3, K=4, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, VOCAB, rng.integers(3, 15)).tolist() for _ in range(B)]
    responses = [[rng.integers(1, VOCAB, rng.integers(1, 8)).tolist() for _ in range(K)] for _ in range(B)]
    return prompts, responses


def _one_at_a_time(model, prompts, responses):
    """Unpadded, uncached reference: each prompt+response alone."""
    out = torch.zeros(len(prompts), len(responses[0]))
    for i, (p, rs) in enumerate(zip(prompts, responses)):
        for k, r in enumerate(rs):
            x = torch.tensor([p + r])
            lp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
            out[i, k] = lp.gather(-1, x[0, 1:, None])[:, 0][-len(r):].sum()
    return out


def test_pad_batch_layouts():
    prompts, responses = [[5, 6, 7], [8]], [[[1], [2, 3]], [[4, 4, 4], [9]]]
    s = pad_batch(prompts, responses, PAD, shared_prompt=True)
    assert s["prompt_input_ids"].tolist() == [[5, 6, 7], [PAD, PAD, 8]]  # left-padded
    assert s["completion_input_ids"].tolist() == [[1, PAD, PAD], [2, 3, PAD], [4, 4, 4], [9, PAD, PAD]]
    assert s["completion_attention_mask"].sum(1).tolist() == [1, 2, 3, 1]
    n = pad_batch(prompts, responses, PAD, shared_prompt=False)
    assert n["input_ids"].shape == (4, 5) and n["input_ids"][2].tolist() == [PAD, 8, 4, 4, 4]
    assert n["completion_mask"].tolist() == [[0, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1]]  # the last Tr positions


def test_naive_and_shared_prompt_logps_match_one_at_a_time():
    model = _model().eval()
    prompts, responses = _ids()
    with torch.no_grad():
        ref = _one_at_a_time(model, prompts, responses)
        naive = sequence_logps(model, pad_batch(prompts, responses, PAD, False), 4)
        shared = sequence_logps(model, pad_batch(prompts, responses, PAD, True), 4)
    assert naive.shape == (3, 4)
    torch.testing.assert_close(naive, ref, atol=FP32_LOGP_ATOL, rtol=0)
    torch.testing.assert_close(shared, ref, atol=FP32_LOGP_ATOL, rtol=0)


def test_paths_agree_under_bf16_autocast():
    model = _model().eval()
    prompts, responses = _ids(B=4, K=4, seed=3)
    nb, sb = pad_batch(prompts, responses, PAD, False), pad_batch(prompts, responses, PAD, True)
    with torch.no_grad():
        f32 = sequence_logps(model, nb, 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            naive, shared = sequence_logps(model, nb, 4), sequence_logps(model, sb, 4)
    tol = BF16_LOGP_RTOL * f32.abs().max().item()
    torch.testing.assert_close(naive, f32, atol=tol, rtol=0)
    torch.testing.assert_close(shared, f32, atol=tol, rtol=0)


def test_shared_prompt_gradient_equals_naive_gradient():
    """Gradients flow through the repeated prompt KV cache: same loss, same gradient."""
    prompts, responses = _ids(B=4, K=4, seed=1)
    ref = torch.randn(4, 4)
    g, g_aux = torch.tensor([0.6, 0.7, 0.2, 0.9]), torch.tensor([[0.5], [0.1], [0.8], [0.4]])
    grads, losses = [], []
    for shared in (False, True):
        model = _model(seed=3)
        m = pair_margins(sequence_logps(model, pad_batch(prompts, responses, PAD, shared), 4), ref, 0.5)
        loss = vrpo_loss(m, 1.0, 1.0, g, g_aux)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=0)
    assert grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=FP32_GRAD_RTOL, atol=1e-6)


def test_lam_zero_is_dpo_exactly():
    gen = torch.Generator().manual_seed(0)
    logps, ref = torch.randn(16, 4, generator=gen) * 5, torch.randn(16, 4, generator=gen) * 5
    beta = 0.1
    dpo = (-F.logsigmoid(beta * ((logps[:, 0] - ref[:, 0]) - (logps[:, 1] - ref[:, 1])))).mean()
    assert torch.equal(vrpo_loss(pair_margins(logps, ref, beta), 1.0, 0.0), dpo)
    # g and the extra pairs are ignored at lam = 0, and (B, 2) log-probs suffice
    assert torch.equal(vrpo_loss(pair_margins(logps[:, :2], ref[:, :2], beta), 1.0, 0), dpo)


def test_vrpo_loss_matches_formula_with_M_extra_pairs():
    gen = torch.Generator().manual_seed(1)
    logps, ref = torch.randn(32, 6, generator=gen), torch.randn(32, 6, generator=gen)  # M = 2
    g, g_aux = torch.rand(32, generator=gen), torch.rand(32, 2, generator=gen)
    beta, lam, q = 0.7, 0.6, 0.9
    d = pair_margins(logps, ref, beta)
    assert d.shape == (32, 3)
    by_formula = logistic_loss(d[:, 0], q).mean() - lam * logistic_loss(d[:, 0], g).mean() \
        + lam * (logistic_loss(d[:, 1], g_aux[:, 0]) + logistic_loss(d[:, 2], g_aux[:, 1])).mean() / 2
    torch.testing.assert_close(vrpo_loss(d, q, lam, g, g_aux), by_formula)
    # docs/method.md s2: l(delta, Z) - l(delta, g) = -(Z - g) delta (here Z = 1)
    torch.testing.assert_close(logistic_loss(d[:, 0], 1.0) - logistic_loss(d[:, 0], g), -(1 - g) * d[:, 0],
                               atol=1e-6, rtol=0)


def test_soft_labels_reproduce_cdpo_and_trl_robust_formulas():
    d = torch.linspace(-6, 6, 101)
    eps = 0.15
    cdpo = -(1 - eps) * F.logsigmoid(d) - eps * F.logsigmoid(-d)
    torch.testing.assert_close(logistic_loss(d, soft_label("sigmoid", eps)), cdpo)
    # trl/trainer/dpo_trainer.py (v1.16), loss_type == "robust"
    trl_robust = (-(1 - eps) * F.logsigmoid(d) + eps * F.logsigmoid(-d)) / (1 - 2 * eps)
    torch.testing.assert_close(logistic_loss(d, soft_label("robust", eps)), trl_robust, atol=1e-6, rtol=1e-6)
    assert soft_label("sigmoid", 0.0) == soft_label("robust", 0.0) == 1.0
    with pytest.raises(ValueError, match="sigmoid"):
        soft_label("ipo", 0.1)
