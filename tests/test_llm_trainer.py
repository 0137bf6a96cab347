"""VRPOTrainer's data handling and configuration: one clear error per bad column (naming column and
row, nothing repaired), pre-tokenised and in-memory data, truncation, config validation, learning."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from llm.tiny_lm import tiny_gpt2, train_bpe_tokenizer  # noqa: E402
from llm.vrpo_trainer import VRPOConfig, VRPOTrainer  # noqa: E402

N = 12


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat dog ran in park hello hi yes no good bad help me please thanks".split()
    sent = lambda k: " ".join(rng.choice(words, k))  # noqa: E731
    d = {"prompt": [f"Human: {sent(6)} Assistant:" for _ in range(N)],
         "chosen": [" good " + sent(3) for _ in range(N)],  # a learnable preference: "good" wins
         "rejected": [" bad " + sent(3) for _ in range(N)],
         "a_1": [" " + sent(4) for _ in range(N)], "a_2": [" " + sent(4) for _ in range(N)],
         "g": rng.uniform(0.2, 1, N).tolist(), "g_aux": rng.uniform(0, 1, N).tolist()}
    tok = train_bpe_tokenizer(d["prompt"] + d["chosen"] + d["rejected"], vocab_size=300)
    return tok, d


def _new(tok, d, tmp_path, model=None, **kw):
    kw = {"report_to": [], "per_device_train_batch_size": 4, "max_steps": 2, "learning_rate": 3e-3, "use_cpu": True,
          "bf16": False, "save_strategy": "no", "disable_tqdm": True, "logging_steps": 1, **kw}
    model = model or tiny_gpt2(len(tok), n_layer=2, n_embd=32, n_head=2, n_positions=64, eos_token_id=tok.eos_token_id)
    return VRPOTrainer(model, args=VRPOConfig(output_dir=str(tmp_path), **kw), train_dataset=d, processing_class=tok)


def _with(d, **cols):
    return {**d, **cols}


@pytest.mark.parametrize("col, value, row, msg", [
    ("g", float("nan"), 3, "nan is not a probability"),
    ("g", 1.3, 5, "1.3 is not a probability"),
    ("g", True, 0, "True is not a probability"),
    ("g", "0.5", 0, "'0.5' is not a probability"),
    ("g_aux", -1.0, 2, "-1.0 is not a probability"),
])
def test_bad_probabilities_name_column_and_row(toy, tmp_path, col, value, row, msg):
    tok, d = toy
    vals = list(d[col])
    vals[row] = value
    if isinstance(value, (str, bool)):  # datasets needs one type per column: the whole column is str / bool
        vals = [value] * N
    with pytest.raises(ValueError, match=rf"train dataset, column '{col}', row {row}: {msg}.*Nothing was repaired"):
        _new(tok, _with(d, **{col: vals}), tmp_path)


def test_paper_alias_columns_are_checked_not_repaired(toy, tmp_path):
    """Issue 8 item 7: NaN, both -1 and (2.0, 0.0) used to become g = 0.5, 0.5 and 1.0 silently."""
    tok, d = toy
    base = {k: d[k] for k in ("prompt", "chosen", "rejected", "a_1", "a_2")}
    ok = {"a_1_preference": [0.5] * N, "a_2_preference": [0.5] * N}
    for cp, rp, col, msg in ((float("nan"), 0.5, "chosen_preference", "nan is not a probability"),
                             (-1.0, -1.0, "chosen_preference", "-1.0 is not a probability"),
                             (2.0, 0.0, "chosen_preference", "2.0 is not a probability"),
                             (0.7, 0.7, "rejected_preference", r"chosen_preference \+ rejected_preference = 1.4")):
        bad = {**base, **ok, "chosen_preference": [0.6] * N, "rejected_preference": [0.4] * N}
        bad["chosen_preference"][4], bad["rejected_preference"][4] = cp, rp
        with pytest.raises(ValueError, match=rf"column '{col}', row 4: {msg}"):
            _new(tok, bad, tmp_path)
    with pytest.raises(ValueError, match="both 'g' and its alias 'chosen_preference'"):
        _new(tok, {**d, **ok, "chosen_preference": [0.6] * N}, tmp_path)


def test_missing_and_inconsistent_columns(toy, tmp_path):
    tok, d = toy
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['g_aux'\] \(lam = 1.0, g_source = 'columns'\)"):
        _new(tok, {k: v for k, v in d.items() if k != "g_aux"}, tmp_path)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['a_1', 'a_2'\]"):
        _new(tok, {k: v for k, v in d.items() if k not in ("a_1", "a_2")}, tmp_path, g_source="constant")
    two = _with(d, a_1=[[x, x] for x in d["a_1"]], a_2=[[x, x] for x in d["a_2"]], g_aux=[[0.5, 0.5]] * N)
    bad = _with(two, g_aux=[[0.5, 0.5]] * (N - 1) + [[0.5]])
    with pytest.raises(ValueError, match=r"column 'g_aux', row 11: 1 extra pairs, but 'a_1_ids'|column 'g_aux', row 11: 1 "
                                         r"extra pairs, but 'a_1' row 0 has 2"):
        _new(tok, bad, tmp_path)
    tokd = {"prompt_ids": [[5, 6]] * N, "chosen_ids": [[7]] * N, "rejected_ids": [[8]] * (N - 1) + [[]],
            "a_1_ids": [[9]] * N, "a_2_ids": [[10]] * N, "g": d["g"], "g_aux": d["g_aux"]}
    with pytest.raises(ValueError, match="column 'rejected_ids', row 11: empty token list"):
        _new(tok, tokd, tmp_path)
    _new(tok, {k: d[k] for k in ("prompt", "chosen", "rejected")}, tmp_path, lam=0.0)  # DPO needs no extra columns


def test_pretokenized_dict_and_dataframe_inputs_equal_the_text_path(toy, tmp_path):
    """The cheap paths: pre-tokenised ids (and a reused ref_logps column) give the same prepared data
    and the same first step as text; a pandas DataFrame or a dict of columns is accepted as is."""
    import pandas as pd

    tok, d = toy
    text = _new(tok, d, tmp_path / "t", precompute_ref_log_probs=True)
    prepared = text.train_dataset
    ids = {c: prepared[c] for c in prepared.column_names}
    pre = _new(tok, ids, tmp_path / "p", precompute_ref_log_probs=True)
    assert pre.train_dataset["a_1_ids"] == prepared["a_1_ids"] and pre.train_dataset["ref_logps"] == prepared["ref_logps"]
    frame = _new(tok, pd.DataFrame(d), tmp_path / "f", precompute_ref_log_probs=True)
    assert frame.train_dataset["chosen_ids"] == prepared["chosen_ids"]
    text.train()
    pre.train()
    assert [h["loss"] for h in pre.state.log_history if "loss" in h] == \
        [h["loss"] for h in text.state.log_history if "loss" in h]
    bad = {**ids, "ref_logps": [r[:3] for r in ids["ref_logps"]]}
    with pytest.raises(ValueError, match="column 'ref_logps', row 0: needs 4 finite log-probs"):
        _new(tok, bad, tmp_path / "b", precompute_ref_log_probs=True)


def test_truncation_keeps_prompt_end_and_response_start(toy, tmp_path):
    tok, d = toy
    full = _new(tok, d, tmp_path, lam=1.0).train_dataset
    cut = _new(tok, d, tmp_path, lam=1.0, max_prompt_length=4, max_completion_length=2).train_dataset
    for i in range(N):
        assert cut[i]["prompt_ids"] == full[i]["prompt_ids"][-4:]
        assert cut[i]["chosen_ids"] == full[i]["chosen_ids"][:2]
        assert cut[i]["a_2_ids"] == [full[i]["a_2_ids"][0][:2]]


@pytest.mark.parametrize("kw, msg", [
    (dict(lam=-1), "lam must be a finite number >= 0 or 'auto', got -1"),
    (dict(lam=float("nan")), "lam must be a finite number"),
    (dict(lam="often"), "lam must be a number >= 0 or 'auto', got 'often'"),
    (dict(lam_auto_decay=0.0), "lam_auto_decay"),
    (dict(g_source="oracle"), "g_source"),
    (dict(loss_type="ipo"), r"one loss_type from \('sigmoid', 'robust'\)"),
    (dict(loss_type=["sigmoid", "sft"]), "one loss_type"),
    (dict(label_smoothing=0.5), "label_smoothing must be in"),
    (dict(beta=0.0), "beta must be > 0"),
    (dict(gradient_checkpointing=True), "shared_prompt=True needs the KV cache"),
    (dict(use_weighting=True), "does not support these DPOConfig settings: \\['use_weighting'\\]"),
])
def test_config_validation(tmp_path, kw, msg):
    """Issue 8: the old TrainerConfig accepted lam = -1."""
    with pytest.raises(ValueError, match=msg):
        VRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)
    assert VRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, lam="0.5").lam == 0.5  # CLI strings


def test_command_line_parsing_takes_auto_and_numbers(tmp_path):
    from transformers import HfArgumentParser

    for value, lam in (("auto", "auto"), ("0.25", 0.25)):
        (cfg,) = HfArgumentParser(VRPOConfig).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--lam", value, "--report_to", "none", "--use_cpu", "true"])
        assert cfg.lam == lam and cfg.shared_prompt and not cfg.activation_checkpointing


def test_g_model_needs_g_source_model(toy, tmp_path):
    tok, d = toy
    model = tiny_gpt2(len(tok), n_layer=1, n_embd=16, n_head=2, n_positions=64, eos_token_id=tok.eos_token_id)
    with pytest.raises(ValueError, match="g_source='model' needs g_model"):
        VRPOTrainer(model, args=VRPOConfig(output_dir=str(tmp_path), g_source="model", report_to=[], use_cpu=True),
                    train_dataset=d, processing_class=tok)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_training_learns_the_preference(toy, tmp_path, lam):
    """DPO and VRPO move the implicit reward towards the labels: margin accuracy on the training
    pairs goes from 1/2 (pi = pi_ref gives margin 0) to > 0.9."""
    tok, d = toy
    tr = _new(tok, d, tmp_path, lam=lam, beta=0.5, max_steps=24, precompute_ref_log_probs=True)
    tr.train()
    logps = tr.dataset_logps(tr.train_dataset, model=tr.model)
    ref = torch.tensor(tr.train_dataset["ref_logps"])
    margin = (logps[:, 0] - ref[:, 0]) - (logps[:, 1] - ref[:, 1])
    assert (margin > 0).float().mean().item() > 0.9
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]


def test_model_given_as_a_path(toy, tmp_path):
    """The Pythia/Qwen route: ``model`` as a local path (TRL loads policy and reference from it)."""
    tok, d = toy
    model = tiny_gpt2(len(tok), n_layer=2, n_embd=32, n_head=2, n_positions=64, eos_token_id=tok.eos_token_id)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    tr = _new(tok, d, tmp_path, model=str(tmp_path / "m"), max_steps=1)
    assert tr.ref_model is not None
    tr.train()
    assert np.isfinite(tr.state.log_history[0]["loss"]) and tr.state.log_history[0]["grad_norm"] > 0


def test_conversational_rows_with_extra_pairs(toy, tmp_path):
    """TRL's conversational format: messages rendered by the chat template; each extra response
    continues the same prompt ids, and prompt + response ids are the template's full rendering."""
    tok, d = toy
    tok = __import__("copy").deepcopy(tok)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    say = lambda text: [{"role": "assistant", "content": text.strip()}]  # noqa: E731
    conv = {"prompt": [[{"role": "user", "content": p}] for p in d["prompt"]],
            "chosen": [say(x) for x in d["chosen"]], "rejected": [say(x) for x in d["rejected"]],
            "a_1": [[say(x), say(y)] for x, y in zip(d["a_1"], d["a_2"])],
            "a_2": [[say(y), say(x)] for x, y in zip(d["a_1"], d["a_2"])],
            "g": d["g"], "g_aux": [[g, 1 - g] for g in d["g_aux"]]}
    tr = _new(tok, conv, tmp_path, max_steps=1)
    row = tr.train_dataset[0]
    assert len(row["a_1_ids"]) == len(row["g_aux"]) == 2
    text = tok.apply_chat_template(conv["prompt"][0] + conv["a_1"][0][1], tokenize=False)
    assert row["prompt_ids"] + row["a_1_ids"][1] == tok(text, add_special_tokens=False)["input_ids"]
    assert row["a_1_ids"][1] == row["a_2_ids"][0]  # the same response, tokenised the same way
    tr.train()
    assert np.isfinite(tr.state.log_history[0]["loss"])
