"""Loaders for real preference data: HH-RLHF transcripts, GPT-relabeled HH pairs and
TRL-style preference tables.

Every loader returns a :class:`pandas.DataFrame` with at least ``prompt``, ``chosen``
and ``rejected`` (the human-preferred response first), plus a :class:`LoadReport`
in ``df.attrs["load_report"]`` that counts what was read, skipped or repaired, with
line numbers. Bad input raises :class:`DataFormatError` naming the file and line
(``on_error="raise"``, the default) or is skipped and counted (``on_error="skip"``).

Text convention (shared by all loaders and by ``llm`` training code): a ``prompt``
is the conversation up to and including the final ``"\\n\\nAssistant:"`` marker; a
response is the text after it without the single separating space, so
``join_transcript(prompt, response) == prompt + " " + response`` rebuilds an HH
transcript. Nothing here writes into the repository; data is read from a path.
"""

from __future__ import annotations

import gzip
import io
import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from vrpo_common.fileio import atomic_path, json_default

__all__ = [
    "ASSISTANT",
    "HUMAN",
    "DataFormatError",
    "LoadReport",
    "split_transcript",
    "join_transcript",
    "last_turns",
    "load_hh",
    "load_hh_hub",
    "load_relabeled",
    "load_preference_table",
    "save_preference_table",
    "relabeled_to_preference_table",
    "PREFERENCE_COLUMNS",
]

ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"
ON_ERROR = ("raise", "skip")
PROMPT_MISMATCH = ("common", "skip", "raise")
#: optional columns of the reference code's preference table (VRPO/VRPO README)
PREFERENCE_COLUMNS = ("chosen_preference", "rejected_preference", "a_1_preference", "a_2_preference")


class DataFormatError(ValueError):
    """Malformed preference data; the message starts with ``path:line:``."""


@dataclass
class LoadReport:
    """What a loader read. ``skipped`` and ``repaired`` map a reason to line numbers (1-based)."""

    path: str
    n_lines: int = 0
    n_loaded: int = 0
    skipped: dict[str, list[int]] = field(default_factory=dict)
    repaired: dict[str, list[int]] = field(default_factory=dict)
    notes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def _add(self, table: dict, reason: str, line: int) -> None:
        table.setdefault(reason, []).append(line)

    def summary(self) -> str:
        """One line: ``path: loaded k of n lines; skipped ...; repaired ...``."""
        parts = [f"{self.path}: loaded {self.n_loaded} of {self.n_lines} lines"]
        if self.skipped:
            parts.append("skipped " + ", ".join(f"{len(v)} {k} (lines {_lines(v)})" for k, v in self.skipped.items()))
        if self.repaired:
            parts.append("repaired " + ", ".join(f"{len(v)} {k} (lines {_lines(v)})" for k, v in self.repaired.items()))
        if self.notes:
            parts.append("noted " + ", ".join(f"{len(v)} {k} (lines {_lines(v)})" for k, v in self.notes.items()))
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"path": self.path, "n_lines": self.n_lines, "n_loaded": self.n_loaded,
                "skipped": {k: list(v) for k, v in self.skipped.items()},
                "repaired": {k: list(v) for k, v in self.repaired.items()},
                "notes": {k: list(v) for k, v in self.notes.items()}}


def _lines(v: list[int], k: int = 8) -> str:
    s = ", ".join(map(str, v[:k]))
    return s + (", ..." if len(v) > k else "")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")


# --------------------------------------------------------------------------- transcripts


def split_transcript(text: str) -> tuple[str, str]:
    """Split an HH transcript at its last ``"\\n\\nAssistant:"`` into ``(prompt, response)``.

    ``prompt`` ends with the marker; ``response`` is the rest without its single
    leading space (so ``join_transcript`` inverts this). Raises ``ValueError`` if the
    marker is absent or the response is empty/whitespace.
    """
    if not isinstance(text, str):
        raise ValueError(f"transcript must be a string, got {type(text).__name__}")
    k = text.rfind(ASSISTANT)
    if k < 0:
        raise ValueError("transcript has no '\\n\\nAssistant:' turn")
    cut = k + len(ASSISTANT)
    prompt, response = text[:cut], text[cut:]
    if response.startswith(" "):
        response = response[1:]
    if not response.strip():
        raise ValueError("empty response after the last '\\n\\nAssistant:'")
    return prompt, response


def join_transcript(prompt: str, response: str) -> str:
    """Inverse of :func:`split_transcript`: ``prompt + " " + response``."""
    return prompt + " " + response


def _split_pair(chosen: str, rejected: str) -> tuple[str, str, str, bool]:
    """Split two transcripts of one pair at a shared prompt.

    Returns ``(prompt, chosen_response, rejected_response, repaired)``. When the
    per-transcript splits disagree (a response that itself contains an
    ``"\\n\\nAssistant:"`` turn), the prompt is the longest common prefix cut at its
    last Assistant marker, so both responses are the complete continuations and
    ``repaired`` is True.
    """
    p1, r1 = split_transcript(chosen)
    p2, r2 = split_transcript(rejected)
    if p1 == p2:
        return p1, r1, r2, False
    k = 0
    m = min(len(chosen), len(rejected))
    while k < m and chosen[k] == rejected[k]:
        k += 1
    # the marker must end inside the common prefix
    j = chosen.rfind(ASSISTANT, 0, k)
    while j >= 0 and j + len(ASSISTANT) > k:
        j = chosen.rfind(ASSISTANT, 0, j)
    if j < 0:
        raise ValueError("chosen and rejected share no prompt ending in '\\n\\nAssistant:'")
    cut = j + len(ASSISTANT)
    prompt = chosen[:cut]
    rc, rr = chosen[cut:], rejected[cut:]
    rc = rc[1:] if rc.startswith(" ") else rc
    rr = rr[1:] if rr.startswith(" ") else rr
    if not rc.strip() or not rr.strip():
        raise ValueError("empty response after the shared prompt")
    return prompt, rc, rr, True


def last_turns(prompt: str, max_chars: int | None = None, max_turns: int | None = None) -> str:
    """The end of a conversation: its last ``max_turns`` turns, then at most ``max_chars``.

    Turns start at ``"\\n\\nHuman:"`` or ``"\\n\\nAssistant:"``. Used to keep the part of
    a long prompt nearest the response when an encoder reads only a prefix.
    """
    out = prompt
    if max_turns is not None:
        if max_turns < 1:
            raise ValueError("max_turns must be >= 1")
        starts = sorted(i for m in (HUMAN, ASSISTANT) for i in _find_all(prompt, m))
        if len(starts) > max_turns:
            out = prompt[starts[-max_turns]:]
    if max_chars is not None and len(out) > max_chars:
        out = out[-max_chars:]
    return out.strip()


def _find_all(s: str, sub: str) -> Iterator[int]:
    i = s.find(sub)
    while i >= 0:
        yield i
        i = s.find(sub, i + 1)


# --------------------------------------------------------------------------- jsonl reading


def _open_text(path: Path):
    if str(path).endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _check_path(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file (data are read from a path; see ../shared/data/README.md)")
    return p


def _records(path: Path, report: LoadReport, on_error: str) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each non-blank JSON line; bad JSON raises or skips."""
    with _open_text(path) as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            report.n_lines += 1
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
            except ValueError as e:
                _fail(report, on_error, "malformed JSON", line_no, str(e).split("\n")[0])
                continue
            yield line_no, rec


def _fail(report: LoadReport, on_error: str, reason: str, line: int, detail: str = "") -> None:
    if on_error == "raise":
        msg = f"{report.path}:{line}: {reason}" + (f" ({detail})" if detail else "")
        raise DataFormatError(msg + "; pass on_error='skip' to skip such lines")
    report._add(report.skipped, reason, line)


def _get_str(rec: dict, key: str) -> str:
    if key not in rec:
        raise KeyError(key)
    v = rec[key]
    if not isinstance(v, str):
        raise TypeError(f"field {key!r} must be a string, got {type(v).__name__}")
    return v


def _finish(rows: list[dict], columns: list[str], report: LoadReport) -> pd.DataFrame:
    report.n_loaded = len(rows)
    df = pd.DataFrame(rows, columns=columns)
    df.attrs["load_report"] = report
    return df


# --------------------------------------------------------------------------- HH-RLHF


def load_hh(path, on_error: str = "raise", prompt_mismatch: str = "common") -> pd.DataFrame:
    """Load HH-RLHF lines ``{"chosen": transcript, "rejected": transcript}`` (``.jsonl[.gz]``).

    Returns columns ``prompt, chosen, rejected, line`` (responses, not transcripts;
    ``line`` is the 1-based source line). Pairs whose two transcripts split at
    different prompts (a response containing an Assistant turn) are handled by
    ``prompt_mismatch``: ``"common"`` (default) cuts at the shared prompt and records
    the lines under ``repaired``; ``"skip"`` drops them (counted); ``"raise"`` errors.
    Missing fields, non-strings and empty responses raise or are skipped per
    ``on_error``. The :class:`LoadReport` is in ``df.attrs["load_report"]``.
    """
    _check_choice("on_error", on_error, ON_ERROR)
    _check_choice("prompt_mismatch", prompt_mismatch, PROMPT_MISMATCH)
    path = _check_path(path)
    report = LoadReport(str(path))
    rows = []
    for line_no, rec in _records(path, report, on_error):
        try:
            c, r = _get_str(rec, "chosen"), _get_str(rec, "rejected")
        except KeyError as e:
            _fail(report, on_error, "missing field", line_no, f"no {e.args[0]!r}")
            continue
        except TypeError as e:
            _fail(report, on_error, "wrong field type", line_no, str(e))
            continue
        try:
            pc, rc = split_transcript(c)
            pr, rr = split_transcript(r)
        except ValueError as e:
            reason = "empty response" if "empty" in str(e) else "no Assistant turn"
            _fail(report, on_error, reason, line_no, str(e))
            continue
        if pc != pr:
            if prompt_mismatch == "raise":
                raise DataFormatError(
                    f"{report.path}:{line_no}: chosen and rejected transcripts have different prompts "
                    "at their last Assistant turn; pass prompt_mismatch='common' or 'skip'"
                )
            if prompt_mismatch == "skip":
                report._add(report.skipped, "prompt mismatch", line_no)
                continue
            try:
                pc, rc, rr, _ = _split_pair(c, r)
            except ValueError as e:
                _fail(report, on_error, "prompt mismatch", line_no, str(e))
                continue
            report._add(report.repaired, "prompt mismatch cut at shared prompt", line_no)
        rows.append({"prompt": pc, "chosen": rc, "rejected": rr, "line": line_no})
    return _finish(rows, ["prompt", "chosen", "rejected", "line"], report)


def load_hh_hub(data_dir: str = "harmless-base", split: str = "test", on_error: str = "raise") -> pd.DataFrame:
    """Load ``Anthropic/hh-rlhf`` through ``datasets`` (needs network and ``pip install datasets``).

    Same output as :func:`load_hh`; the rows are written to a temporary JSONL file
    and parsed by :func:`load_hh`, so the checks are identical.
    """
    try:
        from datasets import load_dataset
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError("load_hh_hub needs the 'datasets' package (pip install datasets) and network") from e
    ds = load_dataset("Anthropic/hh-rlhf", data_dir=data_dir, split=split)  # pragma: no cover
    with tempfile.TemporaryDirectory() as tmp:  # pragma: no cover
        p = Path(tmp) / f"{data_dir}-{split}.jsonl"
        with open(p, "w", encoding="utf-8") as fh:
            for ex in ds:
                fh.write(json.dumps({"chosen": ex["chosen"], "rejected": ex["rejected"]}) + "\n")
        return load_hh(p, on_error=on_error)


# --------------------------------------------------------------------------- relabeled HH


RELABELED_COLUMNS = [
    "prompt", "chosen", "rejected", "response_0", "response_1", "human_label", "llm_label",
    "llm_agrees", "objective", "data_subset", "index", "line",
]


def load_relabeled(path, on_error: str = "raise") -> pd.DataFrame:
    """Load GPT-3.5-relabeled HH pairs (Siththaranjan et al. 2023; ``.jsonl[.gz]``).

    Each line has ``prompt`` (conversation without the final Assistant marker),
    ``responses`` (two strings), ``original_label`` (index of the human-preferred
    response), ``label`` (index the LLM annotator preferred under ``objective``),
    ``objective``, ``data_subset`` and ``Index``.

    Returns columns ``prompt`` (with the final ``"\\n\\nAssistant:"`` appended, the
    module's convention), ``chosen``/``rejected`` (by the human label),
    ``response_0, response_1, human_label, llm_label`` (indices 0/1),
    ``llm_agrees`` (LLM label == human label), ``objective, data_subset, index, line``.

    Beware: in these files the ``chosen``/``rejected`` *transcripts* follow the LLM
    label (``responses[label]``), not the human one; the returned ``chosen`` /
    ``rejected`` follow the human label. Lines whose transcript disagrees with
    ``responses[label]`` are listed in the report's ``notes``, as are pairs with two
    identical responses (kept: they carry no preference information).
    """
    _check_choice("on_error", on_error, ON_ERROR)
    path = _check_path(path)
    report = LoadReport(str(path))
    rows = []
    for line_no, rec in _records(path, report, on_error):
        missing = [k for k in ("prompt", "responses", "original_label", "label") if k not in rec]
        if missing:
            _fail(report, on_error, "missing field", line_no, "no " + ", ".join(map(repr, missing)))
            continue
        prompt, resp = rec["prompt"], rec["responses"]
        h, a = rec["original_label"], rec["label"]
        if not isinstance(prompt, str) or not isinstance(resp, list) or len(resp) != 2 or not all(
            isinstance(x, str) for x in resp
        ):
            _fail(report, on_error, "wrong field type", line_no, "need prompt: str and responses: [str, str]")
            continue
        if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x in (0, 1) for x in (h, a)):
            _fail(report, on_error, "bad label", line_no, f"original_label={h!r}, label={a!r}; need 0 or 1")
            continue
        if not all(x.strip() for x in resp):
            _fail(report, on_error, "empty response", line_no)
            continue
        p = prompt.rstrip()
        if not p.endswith(ASSISTANT.strip()):
            p = p + ASSISTANT
        if resp[0] == resp[1]:
            report._add(report.notes, "identical responses", line_no)
        if isinstance(rec.get("chosen"), str) and rec["chosen"] != join_transcript(p, resp[a]):
            report._add(report.notes, "chosen transcript is not responses[label]", line_no)
        rows.append({
            "prompt": p, "chosen": resp[h], "rejected": resp[1 - h], "response_0": resp[0], "response_1": resp[1],
            "human_label": int(h), "llm_label": int(a), "llm_agrees": bool(h == a),
            "objective": rec.get("objective"), "data_subset": rec.get("data_subset"), "index": rec.get("Index"),
            "line": line_no,
        })
    return _finish(rows, RELABELED_COLUMNS, report)


# --------------------------------------------------------------------------- preference tables


def load_preference_table(path, on_error: str = "raise") -> pd.DataFrame:
    """Load a TRL-style preference table from ``.jsonl[.gz]``, ``.parquet`` or ``.csv``.

    Required string columns ``prompt, chosen, rejected``; optional ``a_1, a_2``
    (extra responses for the VR correction) and probability columns
    ``chosen_preference, rejected_preference, a_1_preference, a_2_preference`` (the
    reference code's auxiliary probabilities; numbers in [0, 1]). Empty responses,
    missing values and out-of-range probabilities raise or are skipped.
    """
    _check_choice("on_error", on_error, ON_ERROR)
    path = _check_path(path)
    report = LoadReport(str(path))
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".json")):
        recs = list(_records(path, report, on_error))
        line_nos = [ln for ln, _ in recs]
        df = pd.DataFrame([r for _, r in recs])
    elif name.endswith(".parquet"):
        df = pd.read_parquet(path)
        report.n_lines = len(df)
        line_nos = list(range(1, len(df) + 1))  # row numbers
    elif name.endswith(".csv"):
        df = pd.read_csv(path, keep_default_na=False, na_values=[""])
        report.n_lines = len(df)
        line_nos = list(range(2, len(df) + 2))  # header is line 1
    else:
        raise DataFormatError(f"{path}: unknown table format (use .jsonl[.gz], .parquet or .csv)")
    required = ["prompt", "chosen", "rejected"]
    absent = [c for c in required if c not in df.columns]
    if absent and len(df):
        raise DataFormatError(f"{path}: missing required column(s) {absent}; have {list(df.columns)}")
    text_cols = required + [c for c in ("a_1", "a_2") if c in df.columns]
    pref_cols = [c for c in PREFERENCE_COLUMNS if c in df.columns]
    keep = []
    for i, ln in enumerate(line_nos):
        row = df.iloc[i]
        bad = None
        for c in text_cols:
            v = row[c]
            if not isinstance(v, str):
                bad = ("missing field", f"{c!r} is {v!r}")
                break
            if c != "prompt" and not v.strip():
                bad = ("empty response", f"column {c!r}")
                break
        if bad is None:
            for c in pref_cols:
                v = row[c]
                try:
                    fv = float(v)
                except (TypeError, ValueError):
                    fv = float("nan")
                if not (0.0 <= fv <= 1.0):
                    bad = ("bad preference", f"{c}={v!r} must be a probability in [0, 1]")
                    break
        if bad is not None:
            _fail(report, on_error, bad[0], ln, bad[1])
            continue
        keep.append(i)
    out = df.iloc[keep].reset_index(drop=True)
    for c in pref_cols:
        out[c] = out[c].astype(float)
    out["line"] = [line_nos[i] for i in keep]
    report.n_loaded = len(out)
    out.attrs["load_report"] = report
    return out


def relabeled_to_preference_table(df: pd.DataFrame) -> pd.DataFrame:
    """A :func:`load_relabeled` frame as a TRL-style preference table with the LLM as ``g``.

    ``chosen``/``rejected`` follow the human label; ``chosen_preference`` is the
    annotator's probability that ``chosen`` beats ``rejected`` (1.0 when GPT-3.5
    agrees with the human, else 0.0) and ``rejected_preference = 1 - chosen_preference``,
    the reference code's convention. ``objective, data_subset, index`` are kept.
    """
    need = {"prompt", "chosen", "rejected", "llm_agrees"}
    if not need <= set(df.columns):
        raise ValueError(f"need a load_relabeled frame with columns {sorted(need)}; got {list(df.columns)}")
    out = df[["prompt", "chosen", "rejected"]].copy()
    out["chosen_preference"] = df["llm_agrees"].astype(float).to_numpy()
    out["rejected_preference"] = 1.0 - out["chosen_preference"]
    for c in ("objective", "data_subset", "index"):
        if c in df.columns:
            out[c] = df[c].to_numpy()
    return out.reset_index(drop=True)


def save_preference_table(df: pd.DataFrame, path) -> Path:
    """Write a preference table atomically (temp file, then ``os.replace``): never a partial file.

    Format by suffix: ``.jsonl``, ``.jsonl.gz``, ``.parquet`` or ``.csv``.
    """
    path = Path(path)
    name = path.name.lower()
    with atomic_path(path) as tmp:
        plain = df.copy()
        plain.attrs = {}
        if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(tmp, "wt", encoding="utf-8") as fh:
                for rec in plain.to_dict(orient="records"):
                    fh.write(json.dumps(rec, ensure_ascii=False, default=json_default) + "\n")
        elif name.endswith(".parquet"):
            plain.to_parquet(tmp, index=False)
        elif name.endswith(".csv"):
            plain.to_csv(tmp, index=False)
        else:
            raise ValueError(f"{path}: unknown table format (use .jsonl[.gz], .parquet or .csv)")
    return path



def skip_counts(df: pd.DataFrame) -> Counter:
    """Counter of skip reasons from a loaded frame's report (empty if none)."""
    rep = df.attrs.get("load_report")
    return Counter({k: len(v) for k, v in rep.skipped.items()}) if rep else Counter()
