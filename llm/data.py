"""Loaders for real preference data: HH-RLHF transcripts, GPT-relabeled HH pairs and
TRL-style preference tables.

Every loader returns a :class:`pandas.DataFrame` with at least ``prompt``, ``chosen``
and ``rejected`` (the human-preferred response first), plus a :class:`LoadReport`
in ``df.attrs["load_report"]`` that counts what was read, skipped or repaired, with
line numbers.

Bad input. A bad *line* (malformed or too deeply nested JSON, bytes that are not
UTF-8, a lone surrogate escape, a missing or mistyped field, an empty response, a
preference that is not a number in [0, 1], a CSV row with the wrong number of
fields) raises :class:`DataFormatError` ``"<file>:<line>: <reason> (<detail>)"``
with ``on_error="raise"`` (the default), or is skipped and counted with
``on_error="skip"``. A ``.gz`` file cut short keeps the lines before the cut in skip
mode and reports the first lost line. A file that cannot be read at all raises in
both modes, since skipping it would leave nothing: a ``.gz`` name on plain text (or
gzip content without the name), corrupt gzip data (a damaged stream cannot be
trusted line by line), a CSV file without a header, an unreadable parquet file, a
table missing a required column, a file with no data lines, and a load in which
every line was skipped. A loader never returns an empty frame.

Whenever lines were skipped or repaired, the loader emits a :class:`DataLoadWarning`
whose text is :meth:`LoadReport.summary` (counts per reason and the first line
numbers); a command-line program prints these as plain lines inside
:func:`print_load_warnings`.

Text convention (shared by all loaders and by ``llm`` training code): a ``prompt``
is the conversation up to and including the final ``"\\n\\nAssistant:"`` marker; a
response is the text after it without the single separating space, so
``join_transcript(prompt, response) == prompt + " " + response`` rebuilds an HH
transcript. Nothing here writes into the repository; data is read from a path.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import numbers
import re
import sys
import tempfile
import warnings
import zlib
from contextlib import contextmanager
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
    "DataLoadWarning",
    "LoadReport",
    "print_load_warnings",
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


#: the raise-mode hint: the Python argument and the command-line flag
SKIP_HINT = "pass on_error='skip' (command line: --on-error skip) to skip such lines and count them"
_GZIP_MAGIC = b"\x1f\x8b"


class DataFormatError(ValueError):
    """Malformed preference data; the message starts with ``path:line:`` (``path:`` for a whole-file problem).

    For parquet tables ``line`` is the 1-based row number; for CSV the line where the
    record starts (a quoted field may span lines).
    """


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

    @property
    def n_repaired(self) -> int:
        return sum(len(v) for v in self.repaired.values())

    def _add(self, table: dict, reason: str, line: int) -> None:
        table.setdefault(reason, []).append(line)

    def summary(self) -> str:
        """One line: counts per reason and their first line numbers.

        ``path: loaded k of n lines; skipped m lines: 2 empty response (lines 87, 517), ...;
        repaired ...; noted ...`` (at most 8 line numbers per reason).
        """
        parts = [f"{self.path}: loaded {self.n_loaded} of {self.n_lines} lines"]
        for verb, table in (("skipped", self.skipped), ("repaired", self.repaired), ("noted", self.notes)):
            if table:
                total = sum(len(v) for v in table.values())
                parts.append(f"{verb} {total} {_plural(total, 'line')}: "
                             + ", ".join(f"{len(v)} {k} ({_plural(len(v), 'line')} {_lines(v)})"
                                         for k, v in table.items()))
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"path": self.path, "n_lines": self.n_lines, "n_loaded": self.n_loaded,
                "skipped": {k: list(v) for k, v in self.skipped.items()},
                "repaired": {k: list(v) for k, v in self.repaired.items()},
                "notes": {k: list(v) for k, v in self.notes.items()}}


def _lines(v: list[int], k: int = 8) -> str:
    s = ", ".join(map(str, v[:k]))
    return s + (", ..." if len(v) > k else "")


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


class DataLoadWarning(UserWarning):
    """Lines were skipped or repaired while loading; the text is the report's summary, ``.report`` the
    :class:`LoadReport`. Turn it into an error with ``warnings.simplefilter("error", DataLoadWarning)``."""

    def __init__(self, report: LoadReport):
        super().__init__(report.summary())
        self.report = report


@contextmanager
def print_load_warnings(prog: str, file=None):
    """Within the block, print each :class:`DataLoadWarning` as one plain line ``"<prog>: data: <summary>"``.

    For command-line programs: every load is shown (not once per code location, the
    default for warnings), on ``file`` (default ``sys.stderr``), instead of Python's
    warning format. Other warnings are shown as usual.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("always", DataLoadWarning)
        show_other = warnings.showwarning

        def show(message, category, filename, lineno, file_=None, line=None):
            if issubclass(category, DataLoadWarning):
                print(f"{prog}: data: {message}", file=file or sys.stderr, flush=True)
            else:
                show_other(message, category, filename, lineno, file_, line)

        warnings.showwarning = show
        yield


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


def _check_path(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file (data are read from a path; see ../shared/data/README.md)")
    if p.is_dir():
        raise DataFormatError(f"{p}: is a directory, not a data file")
    return p


def _open_binary(path: Path):
    """The file's bytes, through gzip when its name ends in ``.gz``; name and content must agree.

    A ``.gz`` file is checked in one pass first: corrupt data (a failed CRC or an
    invalid deflate stream) raises, since lines read before the damage was detected
    cannot be trusted; a stream that merely ends early is left to the line reader.
    """
    with open(path, "rb") as fh:
        head = fh.read(8)
    gz = path.name.lower().endswith(".gz")
    if gz and head and not head.startswith(_GZIP_MAGIC):
        raise DataFormatError(f"{path}:1: not a gzip file (the name ends in .gz but the content starts with "
                              f"{head!r}); decompress or rename it")
    if not gz and head.startswith(_GZIP_MAGIC):
        raise DataFormatError(f"{path}: gzip-compressed content; rename it to end in .gz")
    if not gz:
        return open(path, "rb")
    n_newlines = 0
    try:
        with gzip.open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                n_newlines += chunk.count(b"\n")
    except EOFError:
        pass  # truncated: the line reader keeps the whole lines before the cut (or raises, per on_error)
    except (gzip.BadGzipFile, zlib.error) as e:
        raise DataFormatError(f"{path}: corrupt gzip data ({e}; found after {n_newlines} lines); the file cannot "
                              "be trusted line by line: obtain it again") from e
    return gzip.open(path, "rb")


def _text_lines(path: Path, report: LoadReport, on_error: str) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for each non-blank line, each decoded from UTF-8 on its own.

    Lines split at ``"\n"`` (1-based numbers count every line); a UTF-8 byte-order mark
    on line 1 is dropped. Undecodable bytes fail that line ("not UTF-8"); a gzip stream
    that ends early fails at the first line it lost ("truncated gzip, rest of file lost").
    """
    line_no = 0
    with _open_binary(path) as fh:
        lines = iter(fh)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except EOFError:
                _fail(report, on_error, "truncated gzip, rest of file lost", line_no + 1,
                      "the compressed stream ends before its end marker")
                return
            except (gzip.BadGzipFile, zlib.error) as e:  # damaged after the integrity check
                raise DataFormatError(f"{report.path}:{line_no + 1}: corrupt gzip data ({e})") from e
            line_no += 1
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                report.n_lines += 1
                _fail(report, on_error, "not UTF-8", line_no, f"byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line")
                continue
            if not text.strip():
                continue
            report.n_lines += 1
            yield line_no, text


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(obj) -> str | None:
    """Where (``'chosen'``, ``'responses'[0]``) a decoded JSON value holds a string that is not
    valid Unicode (an unpaired ``\\uD800``-``\\uDFFF`` escape), or ``None``."""
    stack = [(obj, "")]
    while stack:
        x, where = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return where or "value"
        elif isinstance(x, dict):
            for k, v in x.items():
                stack.append((k, f"{where}{k!r} (a key)"))
                stack.append((v, f"{where}[{k!r}]" if where else repr(k)))
        elif isinstance(x, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(x))
    return None


def _records(path: Path, report: LoadReport, on_error: str) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each non-blank JSON line; bad lines raise or are skipped."""
    for line_no, text in _text_lines(path, report, on_error):
        try:
            rec = json.loads(text)
            if not isinstance(rec, dict):
                raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
        except RecursionError:
            _fail(report, on_error, "malformed JSON", line_no, "nested too deeply")
            continue
        except ValueError as e:
            _fail(report, on_error, "malformed JSON", line_no, str(e).split("\n")[0])
            continue
        if _SURROGATE_ESCAPE.search(text):  # a lone surrogate can only come from such an escape
            where = _lone_surrogate(rec)
            if where is not None:
                _fail(report, on_error, "invalid Unicode", line_no,
                      f"field {where} contains a lone surrogate escape such as \\ud800, which no UTF-8 text can hold")
                continue
        yield line_no, rec


def _fail(report: LoadReport, on_error: str, reason: str, line: int, detail: str = "") -> None:
    if on_error == "raise":
        msg = f"{report.path}:{line}: {reason}" + (f" ({detail})" if detail else "")
        raise DataFormatError(f"{msg}; {SKIP_HINT}")
    report._add(report.skipped, reason, line)


def _get_str(rec: dict, key: str) -> str:
    if key not in rec:
        raise KeyError(key)
    v = rec[key]
    if not isinstance(v, str):
        raise TypeError(f"field {key!r} must be a string, got {type(v).__name__}")
    return v


def _check_loaded(report: LoadReport, what: str = "data lines") -> None:
    """A loader never returns an empty frame: no data at all, or every line skipped, is an error."""
    if report.n_loaded:
        return
    if report.n_lines == 0 and not report.skipped:
        raise DataFormatError(f"{report.path}: no {what} (the file is empty)")
    raise DataFormatError(f"{report.summary()}; nothing usable was loaded")


def _warn(report: LoadReport, stacklevel: int) -> None:
    if report.skipped or report.repaired:
        warnings.warn(DataLoadWarning(report), stacklevel=stacklevel + 1)


def _finish(rows: list[dict], columns: list[str], report: LoadReport) -> pd.DataFrame:
    """The frame of a JSON-lines loader; warns (pointing at the loader's caller) if lines were dropped or changed."""
    report.n_loaded = len(rows)
    _check_loaded(report)
    df = pd.DataFrame(rows, columns=columns)
    df.attrs["load_report"] = report
    _warn(report, stacklevel=3)  # _warn <- _finish <- load_* <- caller
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
    reference code's auxiliary probabilities). A probability must be a number in
    [0, 1] (an int, a float; in CSV its decimal text); strings, booleans, NaN and
    missing values are bad preferences. Missing or non-string text, empty responses
    and bad preferences raise (naming column and line) or are skipped, per
    ``on_error``. Returns the table's columns plus ``line`` (JSON lines: the line;
    CSV: the line where the record starts; parquet: the 1-based row), probability
    columns as float64. A file with no data rows, or a table without a required
    column, raises :class:`DataFormatError` in both modes.
    """
    _check_choice("on_error", on_error, ON_ERROR)
    path = _check_path(path)
    report = LoadReport(str(path))
    name = path.name.lower()
    from_text = False  # CSV holds numbers as text
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".json")):
        recs = list(_records(path, report, on_error))
        line_nos = [ln for ln, _ in recs]
        records = [r for _, r in recs]
        columns = list(dict.fromkeys(k for r in records for k in r))  # union, first-seen order
        frame = None
    elif name.endswith(".parquet"):
        frame = _read_parquet(path)
        report.n_lines = len(frame)
        line_nos = list(range(1, len(frame) + 1))  # row numbers
    elif name.endswith(".csv"):
        frame, line_nos = _read_csv(path, report, on_error)
        from_text = True
    else:
        raise DataFormatError(f"{path}: unknown table format (use .jsonl[.gz], .parquet or .csv)")
    if frame is not None:
        records = frame.to_dict(orient="records")
        columns = list(frame.columns)
    if report.n_lines == 0 and not report.skipped:
        raise DataFormatError(f"{path}: no data lines (the table is empty)")
    required = ["prompt", "chosen", "rejected"]
    absent = [c for c in required if c not in columns]
    if absent and records:
        raise DataFormatError(f"{path}: missing required column(s) {absent}; have {columns}")
    text_cols = required + [c for c in ("a_1", "a_2") if c in columns]
    pref_cols = [c for c in PREFERENCE_COLUMNS if c in columns]
    keep, probs = [], {c: [] for c in pref_cols}
    for i, (ln, rec) in enumerate(zip(line_nos, records)):
        bad = _bad_text(rec, text_cols)
        values = {}
        if bad is None:
            for c in pref_cols:
                values[c], problem = _probability(rec.get(c), from_text)
                if problem:
                    bad = ("bad preference", f"column {c!r} {problem}; need a number in [0, 1]")
                    break
        if bad is not None:
            _fail(report, on_error, bad[0], ln, bad[1])
            continue
        keep.append(i)
        for c in pref_cols:
            probs[c].append(values[c])
    report.n_loaded = len(keep)
    _check_loaded(report)
    if frame is None:
        out = pd.DataFrame([records[i] for i in keep], columns=columns)
    else:
        out = frame.iloc[keep].reset_index(drop=True)
    for c in pref_cols:
        out[c] = np.asarray(probs[c], dtype=np.float64)
    out["line"] = [line_nos[i] for i in keep]
    out.attrs["load_report"] = report
    _warn(report, stacklevel=2)  # _warn <- load_preference_table <- caller
    return out


def _bad_text(rec: dict, columns: list[str]) -> tuple[str, str] | None:
    """``(reason, detail)`` for the first unusable text column of a table row, else ``None``."""
    for c in columns:
        v = rec.get(c)
        if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
            return "missing field", f"column {c!r} is {'absent' if c not in rec else 'empty'}"
        if not isinstance(v, str):
            return "wrong field type", f"column {c!r} is {type(v).__name__} {v!r}, need a string"
        if c != "prompt" and not v.strip():
            return "empty response", f"column {c!r}"
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return "invalid Unicode", f"column {c!r} contains a lone surrogate, which no UTF-8 text can hold"
    return None


def _probability(v, from_text: bool) -> tuple[float, str]:
    """``(value, "")`` for a probability in [0, 1], else ``(nan, what is wrong)``."""
    nan = float("nan")
    if v is None or v is pd.NA:
        return nan, "is missing"
    if isinstance(v, (bool, np.bool_)):
        return nan, f"is the boolean {bool(v)}"
    if isinstance(v, str):
        if not from_text:
            return nan, f"is the string {v!r}"
        try:
            v = float(v)
        except ValueError:
            return nan, f"is the string {v!r}"
    if not isinstance(v, numbers.Real):
        return nan, f"is a {type(v).__name__}"
    x = float(v)
    if math.isnan(x):
        return nan, "is NaN" if not from_text else "is missing or NaN"
    if not 0.0 <= x <= 1.0:
        return nan, f"= {v!r} is outside"
    return x, ""


def _read_parquet(path: Path) -> pd.DataFrame:
    errors: tuple = (ValueError, OSError)
    try:
        import pyarrow

        errors += (pyarrow.ArrowException,)
    except ImportError:  # pragma: no cover - pandas then names the missing engine
        pass
    try:
        return pd.read_parquet(path)
    except errors as e:
        raise DataFormatError(f"{path}: not a readable parquet file ({type(e).__name__}: {str(e).splitlines()[0]})") from e


@contextmanager
def _csv_field_limit(limit: int = 2**31 - 1):
    """Lift the csv module's 128 KiB field limit (long transcripts) for the block."""
    old = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _read_csv(path: Path, report: LoadReport, on_error: str) -> tuple[pd.DataFrame, list[int]]:
    """A CSV table and the line where each kept record starts.

    The csv module finds the records (a quoted field may span lines) and checks each
    one's field count and bytes; the well-formed records are then parsed by pandas,
    so column types are pandas' (text and probability columns are read as text).
    """
    raw = path.read_bytes()
    if raw.startswith(_GZIP_MAGIC):
        raise DataFormatError(f"{path}: gzip-compressed content; decompress it (a .csv table is read as plain text)")
    # undecodable bytes become lone surrogates U+DC80..U+DCFF: found per record below
    text = raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    header, rows, line_nos = None, [], []
    reader = csv.reader(io.StringIO(text, newline=""))
    end = 0
    with _csv_field_limit():
        while True:
            start = end + 1
            try:
                rec = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                _fail(report, on_error, "unreadable CSV, rest of file lost", start, str(e))
                break
            end = reader.line_num
            if not rec:  # blank line
                continue
            bad = next(((j, f) for j, f in enumerate(rec) if _has_escaped_byte(f)), None)
            if header is None:
                if bad is not None:
                    raise DataFormatError(f"{path}:{start}: header is not UTF-8")
                header = rec
                continue
            report.n_lines += 1
            if bad is not None:
                j, f = bad
                b = next(ord(ch) - 0xDC00 for ch in f if 0xDC80 <= ord(ch) <= 0xDCFF)
                col = header[j] if j < len(header) else f"field {j + 1}"
                _fail(report, on_error, "not UTF-8", start, f"column {col!r} has byte 0x{b:02x}")
                continue
            if len(rec) != len(header):
                _fail(report, on_error, "wrong number of fields", start,
                      f"expected {len(header)} as in the header, got {len(rec)}")
                continue
            rows.append(rec)
            line_nos.append(start)
    if header is None:
        raise DataFormatError(f"{path}: empty CSV file (no header line)")
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header] + rows)
    as_text = {c: str for c in header if c in ("prompt", "chosen", "rejected", "a_1", "a_2") + PREFERENCE_COLUMNS}
    frame = pd.read_csv(io.StringIO(buf.getvalue()), keep_default_na=False, na_values=[""], dtype=as_text)
    if len(frame) != len(rows):  # pragma: no cover - the two parsers disagree
        raise DataFormatError(f"{path}: CSV parsed into {len(frame)} rows but {len(rows)} records were found")
    return frame, line_nos


def _has_escaped_byte(s: str) -> bool:
    return not s.isascii() and any(0xDC80 <= ord(ch) <= 0xDCFF for ch in s)


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
