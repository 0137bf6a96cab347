"""VRPOTrainer against trl.DPOTrainer: the equalities of issue 11 item 5, the soft labels (cDPO,
robust DPO), g sources, power-tuned lam, exact resume and its refusals."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch.nn.functional as F  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from llm.tiny_lm import tiny_gpt2, train_bpe_tokenizer  # noqa: E402
from llm.vrpo_loss import PowerTuning, pair_margins, sequence_logps  # noqa: E402
from llm.vrpo_trainer import NonFiniteError, VRPOConfig, VRPOTrainer  # noqa: E402
from vrpo.loss import logistic_loss  # noqa: E402

# Two code paths (TRL's right-padded rows vs our left-padded or shared-prompt forward) give the
# same sums of fp32 log-probs up to ~1e-6; after 3 AdamW steps at lr 1e-3 the parameters agree
# to a few 1e-7 (Adam normalises the update, so the error does not grow with the gradient).
LOSS_ATOL = 2e-5
PARAM_ATOL = 2e-5
N = 16


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def text():
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat dog ran in park hello hi yes no good bad help me please thanks".split()
    sent = lambda k: " ".join(rng.choice(words, k))  # noqa: E731
    d = {"prompt": [f"Human: {sent(int(rng.integers(3, 9)))} Assistant:" for _ in range(N)],
         "chosen": [" good " + sent(int(rng.integers(1, 5))) for _ in range(N)],
         "rejected": [" bad " + sent(int(rng.integers(1, 5))) for _ in range(N)],
         "a_1": [[" " + sent(int(rng.integers(1, 6))) for _ in range(2)] for _ in range(N)],
         "a_2": [[" " + sent(int(rng.integers(1, 6))) for _ in range(2)] for _ in range(N)],
         "g": rng.uniform(0.3, 1, N).tolist(), "g_aux": rng.uniform(0, 1, (N, 2)).tolist()}
    tok = train_bpe_tokenizer(d["prompt"] + d["chosen"] + d["rejected"] + sum(d["a_1"], []), vocab_size=300)
    return tok, d


def _model(tok, seed=0):
    return tiny_gpt2(len(tok), n_layer=2, n_embd=32, n_head=2, n_positions=96, eos_token_id=tok.eos_token_id,
                     seed=seed)


COMMON = dict(report_to=[], per_device_train_batch_size=4, max_steps=3, logging_steps=1, use_cpu=True, bf16=False,
              learning_rate=1e-3, save_strategy="no", disable_tqdm=True, gradient_checkpointing=False, seed=0)


def _vrpo(tok, d, tmp_path, model=None, g_model=None, **kw):
    args = VRPOConfig(output_dir=str(tmp_path / "vrpo"), **{**COMMON, **kw})
    return VRPOTrainer(model or _model(tok), args=args, train_dataset=datasets.Dataset.from_dict(d),
                       processing_class=tok, g_model=g_model)


def _dpo(tok, d, tmp_path, **kw):
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), **{**COMMON, **kw})
    model = _model(tok)
    ref = None if kw.get("precompute_ref_log_probs") else _model(tok)
    return DPOTrainer(model, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_dict(d),
                      processing_class=tok)


def _losses(tr):
    return [h["loss"] for h in tr.state.log_history if "loss" in h]


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _assert_same_run(a, b):
    np.testing.assert_allclose(_losses(a), _losses(b), atol=LOSS_ATOL, rtol=0)
    assert len(_losses(a)) == COMMON["max_steps"]
    torch.testing.assert_close(_params(a.model), _params(b.model), atol=PARAM_ATOL, rtol=0)
    assert (_params(a.model) - _params(_model(a.processing_class))).abs().max() > 100 * PARAM_ATOL  # it trained


def _pairs(d, a, b, m=0):
    """TRL's columns with (chosen, rejected) = (d[a][m], d[b][m])."""
    return {"prompt": d["prompt"], "chosen": [x[m] for x in d[a]], "rejected": [x[m] for x in d[b]]}


# ------------------------------------------------------------------------------ equalities with TRL
@pytest.mark.parametrize("shared_prompt", [True, False])
def test_lam_zero_reproduces_trl_dpotrainer(text, tmp_path, shared_prompt):
    tok, d = text
    dpo = _dpo(tok, d, tmp_path)
    dpo.train()
    vr = _vrpo(tok, d, tmp_path, lam=0.0, shared_prompt=shared_prompt)
    vr.train()
    _assert_same_run(vr, dpo)


def test_lam_zero_with_precomputed_reference_reproduces_trl(text, tmp_path):
    tok, d = text
    dpo = _dpo(tok, d, tmp_path, precompute_ref_log_probs=True)
    dpo.train()
    vr = _vrpo(tok, d, tmp_path, lam=0.0, precompute_ref_log_probs=True)
    np.testing.assert_allclose(np.asarray(vr.train_dataset["ref_logps"])[:, 0], dpo.train_dataset["ref_chosen_logps"],
                               atol=1e-5)
    vr.train()
    _assert_same_run(vr, dpo)


@pytest.mark.parametrize("g_aux, order", [(1.0, ("a_1", "a_2")), (0.0, ("a_2", "a_1"))])
def test_g_equal_to_label_leaves_the_extra_pair_dpo(text, tmp_path, g_aux, order):
    """g = 1 (the label): the labelled terms cancel at lam = 1 and only lam * l(delta_aux, g_aux) is left:
    DPO on (a_1, a_2) for g_aux = 1, on (a_2, a_1) for g_aux = 0 (one extra pair)."""
    tok, d = text
    one = {**d, "a_1": [[x[0]] for x in d["a_1"]], "a_2": [[x[0]] for x in d["a_2"]], "g": [1.0] * N,
           "g_aux": [[g_aux]] * N}
    vr = _vrpo(tok, one, tmp_path, lam=1.0)
    vr.train()
    dpo = _dpo(tok, _pairs(d, *order), tmp_path)
    dpo.train()
    _assert_same_run(vr, dpo)


@pytest.mark.parametrize("shared_prompt", [True, False])
def test_robust_loss_lam_zero_reproduces_trl_robust(text, tmp_path, shared_prompt):
    tok, d = text
    dpo = _dpo(tok, d, tmp_path, loss_type=["robust"], label_smoothing=0.2)
    dpo.train()
    vr = _vrpo(tok, d, tmp_path, lam=0.0, loss_type="robust", label_smoothing=0.2, shared_prompt=shared_prompt)
    vr.train()
    _assert_same_run(vr, dpo)


# ------------------------------------------------------------------------------ the loss on a batch
def _batch_and_margins(tr, idx=(0, 1, 2, 3)):
    """A collated batch, the policy's margins (with grad) and the batch as the trainer sees it."""
    rows = [tr.train_dataset[i] for i in idx]
    batch = tr.data_collator(rows)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in tr.model.parameters():  # move the policy off pi_ref: margins non-zero
            p.add_(0.05 * torch.randn_like(p))
    ref = tr._reference_logps(batch)
    return batch, pair_margins(sequence_logps(tr.model, batch, tr._K), ref, tr.beta)


@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_conservative_dpo_soft_label_on_the_labelled_pair(text, tmp_path, lam):
    """label_smoothing eps with the sigmoid loss: l(delta, 1 - eps) on the labelled pair, at lam = 0 and > 0."""
    tok, d = text
    eps = 0.1
    tr = _vrpo(tok, d, tmp_path, lam=lam, label_smoothing=eps, beta=0.5)
    batch, m = _batch_and_margins(tr)
    loss = tr.compute_loss(tr.model, batch)
    dl = m[:, 0]
    expect = (-(1 - eps) * F.logsigmoid(dl) - eps * F.logsigmoid(-dl)).mean()
    if lam:
        expect = expect - lam * logistic_loss(dl, batch["g"]).mean() + lam * logistic_loss(m[:, 1:], batch["g_aux"]).mean()
    torch.testing.assert_close(loss, expect, atol=1e-6, rtol=0)
    assert abs(expect.item() - (-F.logsigmoid(dl)).mean().item()) > 1e-3  # eps matters here


def test_robust_with_lam_is_vr_around_the_debiased_label(text, tmp_path):
    tok, d = text
    eps, lam = 0.2, 0.5
    tr = _vrpo(tok, d, tmp_path, lam=lam, loss_type="robust", label_smoothing=eps, beta=0.5)
    batch, m = _batch_and_margins(tr)
    dl = m[:, 0]
    trl_robust = ((-(1 - eps) * F.logsigmoid(dl) + eps * F.logsigmoid(-dl)) / (1 - 2 * eps)).mean()
    expect = trl_robust - lam * logistic_loss(dl, batch["g"]).mean() + lam * logistic_loss(m[:, 1:], batch["g_aux"]).mean()
    torch.testing.assert_close(tr.compute_loss(tr.model, batch), expect, atol=1e-6, rtol=0)


def test_g_sources_model_constant_and_aliases(text, tmp_path):
    tok, d = text
    base = {k: d[k] for k in ("prompt", "chosen", "rejected", "a_1", "a_2")}

    def g_model(prompts, a, b):  # "longer is better", BT link
        return 1 / (1 + np.exp(-(np.array([len(x) for x in a]) - np.array([len(x) for x in b])) / 5))

    tr = _vrpo(tok, base, tmp_path, lam=1.0, g_source="model", g_model=g_model)
    np.testing.assert_allclose(tr.train_dataset["g"], g_model(None, d["chosen"], d["rejected"]))
    np.testing.assert_allclose(np.asarray(tr.train_dataset["g_aux"])[:, 1],
                               g_model(None, [x[1] for x in d["a_1"]], [x[1] for x in d["a_2"]]))
    const = _vrpo(tok, base, tmp_path, lam=1.0, g_source="constant")
    batch, m = _batch_and_margins(const)
    expect = (-F.logsigmoid(m[:, 0])).mean() - logistic_loss(m[:, 0], 0.5).mean() + logistic_loss(m[:, 1:], 0.5).mean()
    torch.testing.assert_close(const.compute_loss(const.model, batch), expect, atol=1e-6, rtol=0)
    # the reference code's column names
    alias = {**base, "chosen_preference": d["g"], "rejected_preference": [1 - x for x in d["g"]],
             "a_1_preference": d["g_aux"], "a_2_preference": [[1 - x for x in r] for r in d["g_aux"]]}
    tr_a = _vrpo(tok, alias, tmp_path, lam=1.0)
    np.testing.assert_allclose(tr_a.train_dataset["g"], d["g"], atol=1e-12)
    np.testing.assert_allclose(tr_a.train_dataset["g_aux"], d["g_aux"], atol=1e-12)


def test_self_g_is_the_frozen_policy_refreshed_every_k_steps(text, tmp_path):
    tok, d = text
    tr = _vrpo(tok, d, tmp_path, lam=1.0, g_source="self", self_g_refresh=2, max_steps=3, beta=1.0)
    snapshots = []

    class Spy:  # the frozen parameters seen at the start of every step
        def __init__(self):
            self.orig = tr._g

        def __call__(self, inputs, ref):
            out = self.orig(inputs, ref)
            snapshots.append((tr.state.global_step, _params_of(tr._frozen), _params(tr.model)))
            return out

    def _params_of(dct):
        return torch.cat([v.flatten() for v in dct.values()]).clone()

    tr._g = Spy()
    tr.train()
    (s0, f0, p0), (s1, f1, p1), (s2, f2, p2) = snapshots
    assert (s0, s1, s2) == (0, 1, 2)
    assert torch.equal(f0, p0) and torch.equal(f1, f0) and not torch.equal(f1, p1)  # refreshed at 0, kept at 1
    assert torch.equal(f2, p2)  # refreshed at 2


def test_nan_guard_stops_before_the_optimizer_step(text, tmp_path):
    tok, d = text
    tr = _vrpo(tok, d, tmp_path, lam=1.0)
    with torch.no_grad():
        tr.model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    before = _params(tr.model).clone()
    with pytest.raises(NonFiniteError, match="step 0: loss nan.*lower the learning rate"):
        tr.train()
    assert torch.equal(_params(tr.model).isnan(), before.isnan())


# ------------------------------------------------------------------------------ lam = "auto"
def test_power_tuning_converges_to_the_population_optimum():
    """Oracle g with noise: u = s - Z, w = s - g, e = s_m - g_m with s ~ U(0.1, 0.9), p* = clip(s + b),
    g = p* + N(0, tau^2). E[u w] = E[(s - p*)^2] =: D, E[w^2] = E[e^2] = D + tau^2, so
    lam* = D / ((D + tau^2)(1 + 1/M)). Streamed in minibatches with decay 1; tolerance 4 SE of the
    estimate over 40 seeded replications' spread."""
    M, b, tau, B, steps = 2, 0.15, 0.05, 32, 400
    D = b ** 2  # p* = s + b exactly (no clipping for s <= 0.85 and b = 0.15; s ~ U(0.1, 0.7) below)
    lam_star = D / ((D + tau ** 2) * (1 + 1 / M))
    est = []
    for rep in range(40):
        g_ = torch.Generator().manual_seed(rep)
        pt = PowerTuning(decay=1.0)
        for _ in range(steps):
            s = 0.1 + 0.6 * torch.rand(B, 1 + M, generator=g_, dtype=torch.float64)
            p = s + b
            Z = (torch.rand(B, generator=g_, dtype=torch.float64) < p[:, 0]).double()
            g = p + tau * torch.randn(B, 1 + M, generator=g_, dtype=torch.float64)
            margins = torch.log(s / (1 - s))  # sigma(margins) = s
            pt.update(PowerTuning.batch_sums(margins, Z, g[:, 0], g[:, 1:]).tolist())  # label q = Z here
        est.append(pt.lam_raw)
    est = np.array(est)
    se = est.std(ddof=1) / np.sqrt(len(est))
    assert abs(est.mean() - lam_star) < 4 * se + 1e-4, (est.mean(), lam_star, se)
    assert est.std(ddof=1) < 0.05  # each replication is close, too


def test_lam_auto_in_the_trainer_uses_past_steps_only(text, tmp_path):
    """At lr = 0 the policy stays pi_ref (all margins 0, s = 1/2): u = 1/2 - 1, w = 1/2 - g, e = 1/2 - g_aux, so
    after k steps lam is the formula over the rows seen in steps < k; the first step uses lam = 0."""
    tok, d = text
    tr = _vrpo(tok, d, tmp_path, lam="auto", lam_auto_decay=1.0, learning_rate=0.0, max_steps=4,
               per_device_train_batch_size=4)
    seen = []
    orig = tr.compute_loss

    def spy(model, inputs, *a, **k):
        seen.append((tr._lam, inputs["g"].double(), inputs["g_aux"].double()))
        return orig(model, inputs, *a, **k)

    tr.compute_loss = spy
    tr.train()
    assert seen[0][0] == 0.0
    for k in range(1, 4):
        g = torch.cat([x[1] for x in seen[:k]])
        ga = torch.cat([x[2] for x in seen[:k]])
        w, e = 0.5 - g, 0.5 - ga
        expect = (-0.5 * w).sum() / ((w * w).sum() + (e * e).sum() / 4)
        assert seen[k][0] == pytest.approx(min(1.0, max(0.0, expect.item())), abs=1e-12)
    logged = [h["lam"] for h in tr.state.log_history if "lam" in h]
    assert logged == pytest.approx([x[0] for x in seen], abs=1e-6)


# ------------------------------------------------------------------------------ checkpoints
class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        control.should_training_stop = state.global_step >= self.step


@pytest.mark.parametrize("kw", [dict(lam=1.0), dict(lam=1.0, g_source="self", self_g_refresh=2),
                                dict(lam="auto", precompute_ref_log_probs=True)])
def test_resume_continues_exactly(text, tmp_path, kw):
    tok, d = text
    run = dict(max_steps=5, save_strategy="steps", save_steps=2, **kw)
    straight = _vrpo(tok, d, tmp_path / "a", **run)
    straight.train()
    first = _vrpo(tok, d, tmp_path / "b", **run)
    first.add_callback(StopAt(2))  # "interrupted" after the step-2 checkpoint
    first.train()
    assert first.state.global_step == 2
    resumed = _vrpo(tok, d, tmp_path / "b", **run)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 5
    assert torch.equal(_params(resumed.model), _params(straight.model))
    assert _losses(resumed)[-3:] == _losses(straight)[-3:]


def test_resume_refuses_other_data_settings_or_reference(text, tmp_path):
    tok, d = text
    run = dict(lam=1.0, max_steps=2, save_strategy="steps", save_steps=2, precompute_ref_log_probs=True)
    _vrpo(tok, d, tmp_path, **run).train()
    ck = str(tmp_path / "vrpo" / "checkpoint-2")
    other = {**d, "chosen": d["rejected"], "rejected": d["chosen"]}  # same size, other data
    with pytest.raises(ValueError, match="other training data"):
        _vrpo(tok, other, tmp_path, **{**run, "max_steps": 4}).train(resume_from_checkpoint=ck)
    with pytest.raises(ValueError, match=r"other VRPO settings.*'beta': \(0.1, 0.5\)"):
        _vrpo(tok, d, tmp_path, **{**run, "max_steps": 4, "beta": 0.5}).train(resume_from_checkpoint=ck)
    with pytest.raises(ValueError, match="reference log-probs differ"):
        _vrpo(tok, d, tmp_path, model=_model(tok, seed=5), **{**run, "max_steps": 4}).train(resume_from_checkpoint=ck)
    dpo_ck = tmp_path / "dpo-ck"
    dpo_ck.mkdir()
    with pytest.raises(ValueError, match="not a VRPOTrainer checkpoint"):
        _vrpo(tok, d, tmp_path, **run).train(resume_from_checkpoint=str(dpo_ck))


def test_no_unsafe_torch_load_anywhere():
    """Issue 8 item 6: no unsafe torch.load (weights_only off) anywhere in the repository, tests included."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    needle = "weights_only=" + "False"
    hits = [str(p) for p in root.rglob("*.py") if ".venv" not in p.parts and needle in p.read_text(encoding="utf-8")]
    assert hits == []
