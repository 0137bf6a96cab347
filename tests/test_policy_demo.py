"""Smoke version of the offline DPO vs VRPO demo, the evaluation helpers and the cost benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH = DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tests/conftest.py


def test_win_rate_and_mean_ci_numbers():
    from llm.evaluate import judge_win_rate as win_rate
    from vrpo_common.stats import mean_ci

    r_a = np.array([[1.0, 0.0], [2.0, 2.0], [0.0, 0.0]])
    r_b = np.array([[0.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    w = win_rate(r_a, r_b)
    # per prompt: (1 + 0)/2, (1 + 1)/2, (0.5 + 0)/2 -> mean 0.5833
    assert w["mean"] == pytest.approx((0.5 + 1.0 + 0.25) / 3)
    assert w["n"] == 3
    ci = mean_ci([0.0, 1.0, 0.0, 1.0])
    assert ci["se"] == pytest.approx(np.std([0, 1, 0, 1], ddof=1) / 2)
    assert ci["lo"] == pytest.approx(0.5 - 1.959963984540054 * ci["se"])


def test_gradient_variance_probe_matches_direct_computation(tmp_path):
    """The pair estimator ||G1 - G2||^2 / 2 recomputed by hand on the same minibatches."""
    pytest.importorskip("trl")
    from llm.tiny_lm import word_tokenizer
    from llm.evaluate import gradient_variance_probe
    from llm.tiny_lm import tiny_gpt2
    from llm.vrpo_loss import pair_margins, sequence_logps, vrpo_loss
    from llm.vrpo_trainer import VRPOConfig, VRPOTrainer

    rng = np.random.default_rng(0)
    n = 12
    ids = lambda lo, hi: rng.integers(1, 50, rng.integers(lo, hi)).tolist()  # noqa: E731
    data = {"prompt_ids": [ids(2, 6) for _ in range(n)], "chosen_ids": [ids(1, 4) for _ in range(n)],
            "rejected_ids": [ids(1, 4) for _ in range(n)], "a_1_ids": [ids(1, 4) for _ in range(n)],
            "a_2_ids": [ids(1, 4) for _ in range(n)], "g": rng.uniform(0, 1, n).tolist(),
            "g_aux": rng.uniform(0, 1, n).tolist(), "ref_logps": rng.normal(-5, 1, (n, 4)).tolist()}
    model = tiny_gpt2(50, n_layer=1, n_embd=16, n_head=2, n_positions=16, seed=0)
    args = VRPOConfig(output_dir=str(tmp_path), beta=0.5, lam=1.0, report_to=[], use_cpu=True, bf16=False)
    tr = VRPOTrainer(model, args=args, train_dataset=data, processing_class=word_tokenizer(50))
    out = gradient_variance_probe(model, tr, lam=1.0, batch_size=4, n_pairs=2, seed=3, progress=False)
    rng2 = np.random.default_rng(3)
    grads = {"dpo": [], "vrpo": []}
    for _ in range(4):
        idx = rng2.choice(n, size=4, replace=False).tolist()
        batch = tr.data_collator([tr.train_dataset[i] for i in idx])
        for lam, key in ((0.0, "dpo"), (1.0, "vrpo")):
            model.zero_grad()
            m = pair_margins(sequence_logps(model, batch, 4), batch["ref_logps"], 0.5)
            vrpo_loss(m, 1.0, lam, batch["g"], batch["g_aux"]).backward()
            grads[key].append(torch.cat([p.grad.flatten().clone() for p in model.parameters()]))
    for key in ("dpo", "vrpo"):
        G = grads[key]
        expect = [float(((G[0] - G[1]).double() ** 2).sum() / 2), float(((G[2] - G[3]).double() ** 2).sum() / 2)]
        np.testing.assert_allclose(out[f"v_{key}"], expect, rtol=1e-4)
    assert out["ratio"] == pytest.approx(np.mean(out["v_vrpo"]) / np.mean(out["v_dpo"]))
    assert out["ratio_lo"] <= out["ratio"] <= out["ratio_hi"]


def test_bench_variants_run_and_report(tmp_path):
    """The benchmark's variants train on the same token ids and report times and memory (speed is not asserted)."""
    pytest.importorskip("trl")
    from llm.bench_policy import run_variant

    s = dict(seed=0, vocab=64, n_layer=1, n_embd=16, prompt_tokens=12, response_tokens=4, batch_size=2, steps=2,
             warmup=1, precision="fp32", model=None, tmp=str(tmp_path))
    for v in ("trl-dpo", "vrpo-shared"):
        r = run_variant(v, s)
        assert r["variant"] == v and len(r["step_s_all"]) == 2 and all(t > 0 for t in r["step_s_all"])
        assert r["peak_mem_mb"] >= 0


def test_demo_config_validation():
    from llm.policy_demo import DemoConfig

    with pytest.raises(ValueError, match="n_embd"):
        DemoConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="lam"):
        DemoConfig(lam=0.0)
    with pytest.raises(ValueError, match="n_gen_prompts"):
        DemoConfig(n_gen_prompts=400, n_eval=300)


@pytest.mark.slow  # ~85 s on an idle core
@pytest.mark.skipif(not HH.exists(), reason=f"HH data not found at {HH} (shared data beside the repository)")
def test_policy_demo_smoke_end_to_end(tmp_path):
    """The whole pipeline at toy size: results with the resolved config, figure and fragment, caches reused."""
    pytest.importorskip("sklearn")
    pytest.importorskip("sentence_transformers")
    from llm.policy_demo import run, smoke_config

    cfg = smoke_config(data_path=str(HH), cache_dir=str(tmp_path / "cache"), results_dir=str(tmp_path / "res"),
                       fig_dir=str(tmp_path / "fig"))
    res = run(cfg)
    saved = json.loads((tmp_path / "res" / "results.json").read_text())
    assert saved["config"]["n_train"] == cfg.n_train and saved["config"]["smoke"] is True
    assert set(saved["win_rates"]) == {"vrpo_vs_dpo", "vrpo_vs_pi_ref", "dpo_vs_pi_ref"}
    for w in saved["win_rates"].values():
        assert 0 <= w["lo"] <= w["mean"] <= w["hi"] <= 1 or np.isnan(w["se"])
    for m in ("dpo", "vrpo"):
        acc = saved["implicit_reward_accuracy"][m]
        assert 0 <= acc["mean"] <= 1 and acc["n"] == cfg.n_eval
        assert len(saved["train_history"][m]) == cfg.steps
    for p in saved["gradient_variance"].values():
        assert p["trace_dpo"] > 0 and p["trace_vrpo"] > 0 and len(p["v_dpo"]) == cfg.probe_pairs
    frag = (tmp_path / "fig" / "sections" / "llm_policy.md").read_text()
    assert "SMOKE" in frag and f"{res['implicit_reward_accuracy']['dpo']['mean']:.3f}" in frag
    assert (tmp_path / "fig" / "llm_policy_summary.png").stat().st_size > 10_000
    ck = sorted((tmp_path / "res").glob("vrpo-*/checkpoint-*/vrpo_state.json"))
    assert [p.parent.name for p in ck] == [f"checkpoint-{s}" for s in (cfg.checkpoint_every, cfg.steps)]
    state = json.loads(ck[-1].read_text())
    assert state["settings"]["lam"] == cfg.lam and state["n_rows"] == cfg.n_train and state["n_extra_pairs"] == 1
    assert len(list((tmp_path / "cache" / "aux").glob("aux-*.json"))) == 1
    again = run(cfg)  # a rerun reuses pi_ref, the samples and the finished checkpoints
    assert again["train_history"] == res["train_history"]
    assert again["timings_s"]["sft_cached_from_earlier_run"] is True


def test_aux_responses_sampled_once_and_reused(tmp_path, monkeypatch):
    from llm import aux_responses as A
    from llm.tiny_lm import tiny_gpt2, train_bpe_tokenizer

    tok = train_bpe_tokenizer(["Human: hi there Assistant: hello friend"] * 20, vocab_size=280)
    model = tiny_gpt2(len(tok), n_layer=1, n_embd=16, n_head=2, n_positions=48, eos_token_id=tok.eos_token_id)
    cfg = A.SamplingConfig(temperature=1.0, max_new_tokens=6, max_prompt_tokens=16, batch_size=3, seed=1)
    prompts = ["Human: hi Assistant:", "Human: there Assistant:", "Human: friend Assistant:", "Human: hello Assistant:"]
    a1, a2 = A.aux_responses(model, tok, prompts, cfg, tmp_path)
    assert len(a1) == len(a2) == 4 and a1 != a2
    # seeded: sampling again (no cache) gives the same responses
    again = A.sample_responses(model, tok, prompts, 2, cfg, progress=False)
    assert [p[0] for p in again] == a1 and [p[1] for p in again] == a2

    def boom(*a, **k):
        raise AssertionError("sampled again instead of reading the cache")

    monkeypatch.setattr(A, "sample_responses", boom)
    assert A.aux_responses(model, tok, prompts, cfg, tmp_path) == (a1, a2)
    with pytest.raises(AssertionError, match="sampled again"):  # other settings -> other cache entry
        A.aux_responses(model, tok, prompts, A.SamplingConfig(temperature=0.7, max_new_tokens=6), tmp_path)
