"""Loaders in llm.data: round trips, bad-input errors, and the split on real HH transcripts."""

from __future__ import annotations

import gzip
import json
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llm.data import (
    DataFormatError,
    DataLoadWarning,
    join_transcript,
    last_turns,
    load_hh,
    load_preference_table,
    load_relabeled,
    print_load_warnings,
    relabeled_to_preference_table,
    save_preference_table,
    split_transcript,
)

HH_FILE = "hh-rlhf/harmless-base-test.jsonl.gz"
RELABELED = {o: f"relabeled-hh-rlhf/{o}/test.jsonl.gz" for o in ("helpful", "harmless")}


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _hh(prompt_turns: str, chosen: str, rejected: str) -> str:
    return json.dumps({"chosen": f"{prompt_turns}\n\nAssistant: {chosen}", "rejected": f"{prompt_turns}\n\nAssistant: {rejected}"})


P1 = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?"


# --------------------------------------------------------------------------- split_transcript


def test_split_transcript_last_assistant_turn_and_inverse():
    text = P1 + "\n\nAssistant: It is 4."
    prompt, response = split_transcript(text)
    assert prompt == P1 + "\n\nAssistant:"
    assert response == "It is 4."
    assert join_transcript(prompt, response) == text


def test_split_transcript_errors():
    with pytest.raises(ValueError, match="no '\\\\n\\\\nAssistant:'"):
        split_transcript("\n\nHuman: only a question")
    with pytest.raises(ValueError, match="empty response"):
        split_transcript(P1 + "\n\nAssistant:   ")


def test_last_turns_keeps_the_end():
    text = P1 + "\n\nAssistant:"
    assert last_turns(text, max_turns=2) == "Human: What is 2+2?\n\nAssistant:"
    assert last_turns(text, max_chars=10) == "Assistant:"


# --------------------------------------------------------------------------- load_hh


def test_load_hh_round_trip_gz_and_plain(tmp_path):
    lines = [_hh(P1, "It is 4.", "Five."), _hh("\n\nHuman: Tell me a joke", "Knock knock.", "No.")]
    plain = _write_lines(tmp_path / "hh.jsonl", lines)
    gz = tmp_path / "hh.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    for path in (plain, gz):
        df = load_hh(path)
        assert list(df.columns[:3]) == ["prompt", "chosen", "rejected"]
        assert df["chosen"].tolist() == ["It is 4.", "Knock knock."]
        assert df["rejected"].tolist() == ["Five.", "No."]
        assert df["line"].tolist() == [1, 2]
        for rec, row in zip(lines, df.itertuples()):
            rec = json.loads(rec)
            assert join_transcript(row.prompt, row.chosen) == rec["chosen"]
            assert join_transcript(row.prompt, row.rejected) == rec["rejected"]
        rep = df.attrs["load_report"]
        assert (rep.n_lines, rep.n_loaded, rep.n_skipped) == (2, 2, 0)


def _bad_hh_lines():
    return [
        _hh(P1, "ok", "fine"),  # 1 good
        "{not json",  # 2 malformed
        json.dumps({"chosen": P1 + "\n\nAssistant: a"}),  # 3 missing rejected
        json.dumps({"chosen": P1 + "\n\nAssistant: a", "rejected": 5}),  # 4 wrong type
        _hh(P1, "", "x"),  # 5 empty response
        json.dumps({"chosen": "\n\nHuman: no reply", "rejected": "\n\nHuman: no reply"}),  # 6 no assistant
        _hh(P1, "good", "bad"),  # 7 good
    ]


@pytest.mark.parametrize(
    "line,pattern",
    [(2, "malformed JSON"), (3, "missing field.*'rejected'"), (4, "wrong field type"), (5, "empty response"),
     (6, "no Assistant turn")],
)
def test_load_hh_raise_names_file_and_line(tmp_path, line, pattern):
    lines = _bad_hh_lines()
    # keep the good first line and the one bad line, at its original line number
    keep = [lines[0]] + [""] * (line - 2) + [lines[line - 1]]
    path = _write_lines(tmp_path / "bad.jsonl", keep)
    with pytest.raises(DataFormatError, match=rf"bad\.jsonl:{line}: {pattern}"):
        load_hh(path)


def test_load_hh_skip_counts_every_reason(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", _bad_hh_lines())
    with pytest.warns(DataLoadWarning) as record:
        df = load_hh(path, on_error="skip")
    assert len(record) == 1 and record[0].message.report is df.attrs["load_report"]
    assert df["chosen"].tolist() == ["ok", "good"]
    rep = df.attrs["load_report"]
    assert rep.n_lines == 7 and rep.n_loaded == 2 and rep.n_skipped == 5
    assert rep.skipped == {"malformed JSON": [2], "missing field": [3], "wrong field type": [4],
                           "empty response": [5], "no Assistant turn": [6]}
    assert rep.summary() == (
        f"{path}: loaded 2 of 7 lines; skipped 5 lines: 1 malformed JSON (line 2), 1 missing field (line 3), "
        "1 wrong field type (line 4), 1 empty response (line 5), 1 no Assistant turn (line 6)"
    )
    assert str(record[0].message) == rep.summary()


def test_load_hh_prompt_mismatch_policies(tmp_path):
    # the chosen response itself contains an Assistant turn: the naive splits disagree
    chosen = P1 + "\n\nAssistant: Let me think.\n\nHuman: ok\n\nAssistant: It is 4."
    rejected = P1 + "\n\nAssistant: Five."
    path = _write_lines(tmp_path / "mm.jsonl", [json.dumps({"chosen": chosen, "rejected": rejected}), _hh(P1, "a", "b")])
    with pytest.warns(DataLoadWarning, match="repaired 1 line"):
        df = load_hh(path)
    assert df["prompt"].iloc[0] == P1 + "\n\nAssistant:"
    assert df["chosen"].iloc[0] == "Let me think.\n\nHuman: ok\n\nAssistant: It is 4."
    assert df["rejected"].iloc[0] == "Five."
    assert df.attrs["load_report"].repaired == {"prompt mismatch cut at shared prompt": [1]}
    with pytest.warns(DataLoadWarning, match=r"skipped 1 line: 1 prompt mismatch \(line 1\)"):
        skipped = load_hh(path, prompt_mismatch="skip")
    assert len(skipped) == 1 and skipped.attrs["load_report"].skipped == {"prompt mismatch": [1]}
    with pytest.raises(DataFormatError, match=r"mm\.jsonl:1: chosen and rejected transcripts have different prompts"):
        load_hh(path, prompt_mismatch="raise")


def test_load_hh_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_hh(tmp_path / "absent.jsonl")
    path = _write_lines(tmp_path / "ok.jsonl", [_hh(P1, "a", "b")])
    with pytest.raises(ValueError, match="on_error"):
        load_hh(path, on_error="ignore")


# --------------------------------------------------------------------------- relabeled


def _relabeled(prompt, r0, r1, human, llm, **kw):
    rec = {"prompt": prompt, "responses": [r0, r1], "original_label": human, "label": llm, "objective": "helpful",
           "data_subset": "harmless", "Index": 7}
    rec.update(kw)
    return json.dumps(rec)


def test_load_relabeled_round_trip_and_errors(tmp_path):
    lines = [
        _relabeled("Human: hi", "A", "B", 1, 1),
        _relabeled("Human: yo", "C", "D", 0, 1),
        json.dumps({"prompt": "Human: x", "responses": ["a", "b"], "label": 0}),  # 3 missing original_label
        _relabeled("Human: z", "a", "b", 2, 0),  # 4 bad label
        _relabeled("Human: z", " ", "b", 0, 0),  # 5 empty response
        _relabeled("Human: z", "a", "b", True, 0),  # 6 bool label
    ]
    path = _write_lines(tmp_path / "rel.jsonl", lines)
    with pytest.raises(DataFormatError, match=r"rel\.jsonl:3: missing field .*'original_label'"):
        load_relabeled(path)
    with pytest.warns(DataLoadWarning, match="loaded 2 of 6 lines"):
        df = load_relabeled(path, on_error="skip")
    assert df["prompt"].tolist() == ["Human: hi\n\nAssistant:", "Human: yo\n\nAssistant:"]
    assert df["chosen"].tolist() == ["B", "C"] and df["rejected"].tolist() == ["A", "D"]
    assert df["llm_agrees"].tolist() == [True, False]
    assert df["human_label"].tolist() == [1, 0] and df["llm_label"].tolist() == [1, 1]
    assert df.attrs["load_report"].skipped == {"missing field": [3], "bad label": [4, 6], "empty response": [5]}


def test_relabeled_to_preference_table_round_trip(tmp_path):
    path = _write_lines(tmp_path / "rel.jsonl", [_relabeled("Human: hi", "A", "B", 1, 1), _relabeled("Human: yo", "C", "D", 0, 1)])
    table = relabeled_to_preference_table(load_relabeled(path))
    assert table["chosen"].tolist() == ["B", "C"]
    assert table["chosen_preference"].tolist() == [1.0, 0.0]  # GPT-3.5 agrees on the first pair only
    assert table["rejected_preference"].tolist() == [0.0, 1.0]
    back = load_preference_table(save_preference_table(table, tmp_path / "pref.parquet"))
    pd.testing.assert_frame_equal(back.drop(columns="line"), table, check_dtype=False)
    with pytest.raises(ValueError, match="load_relabeled frame"):
        relabeled_to_preference_table(table.drop(columns="chosen"))


# --------------------------------------------------------------------------- preference tables


def _table():
    return pd.DataFrame({
        "prompt": ["p1", "p2"], "chosen": ["c1", "c2"], "rejected": ["r1", "r2"], "a_1": ["x", "y"], "a_2": ["u", "v"],
        "chosen_preference": [0.9, 0.6], "rejected_preference": [0.1, 0.4], "a_1_preference": [0.3, 0.5],
        "a_2_preference": [0.7, 0.5],
    })


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".parquet", ".csv"])
def test_preference_table_round_trip(tmp_path, suffix):
    df = _table()
    path = save_preference_table(df, tmp_path / f"t{suffix}")
    back = load_preference_table(path)
    pd.testing.assert_frame_equal(back.drop(columns="line"), df, check_dtype=False)
    assert back.attrs["load_report"].n_loaded == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_preference_table_errors(tmp_path):
    path = _write_lines(tmp_path / "t.jsonl", [
        json.dumps({"prompt": "p", "chosen": "c", "rejected": "r", "chosen_preference": 0.2}),
        json.dumps({"prompt": "p", "chosen": "", "rejected": "r", "chosen_preference": 0.2}),
        json.dumps({"prompt": "p", "chosen": "c", "rejected": "r", "chosen_preference": 1.5}),
        json.dumps({"prompt": "p", "chosen": "c", "rejected": None, "chosen_preference": 0.5}),
    ])
    with pytest.raises(DataFormatError, match=r"t\.jsonl:2: empty response"):
        load_preference_table(path)
    with pytest.warns(DataLoadWarning, match="loaded 1 of 4 lines"):
        df = load_preference_table(path, on_error="skip")
    assert len(df) == 1
    assert df.attrs["load_report"].skipped == {"empty response": [2], "bad preference": [3], "missing field": [4]}
    nocol = _write_lines(tmp_path / "n.jsonl", [json.dumps({"prompt": "p", "chosen": "c"})])
    with pytest.raises(DataFormatError, match=r"missing required column\(s\) \['rejected'\]"):
        load_preference_table(nocol)


def test_save_preference_table_leaves_no_partial_file(tmp_path):
    bad = pd.DataFrame({"prompt": ["p"], "chosen": ["c"], "rejected": [object()]})  # not JSON serialisable
    target = tmp_path / "out.jsonl"
    with pytest.raises(TypeError):
        save_preference_table(bad, target)
    assert not target.exists() and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- real data


def test_real_hh_split_round_trips_and_reports_mismatches(shared_file):
    path = shared_file(HH_FILE)
    with pytest.warns(DataLoadWarning, match=r"loaded 2308 of 2312 lines; skipped 4 lines: 4 empty response "
                      r"\(lines 87, 517, 926, 1104\); repaired 5 lines"):
        df = load_hh(path, on_error="skip")
    rep = df.attrs["load_report"]
    # 2,312 lines (data README); 4 have an empty final response; 5 split at different prompts
    assert rep.n_lines == 2312
    assert rep.skipped == {"empty response": [87, 517, 926, 1104]}
    assert rep.repaired == {"prompt mismatch cut at shared prompt": [1255, 1689, 1951, 1953, 2037]}
    assert len(df) == 2308
    assert df["prompt"].str.endswith("\n\nAssistant:").all()
    raw = [json.loads(x) for x in gzip.open(path, "rt", encoding="utf-8")]
    for row in df.itertuples():
        assert join_transcript(row.prompt, row.chosen) == raw[row.line - 1]["chosen"]
        assert join_transcript(row.prompt, row.rejected) == raw[row.line - 1]["rejected"]
    # a repaired line: the chosen continuation keeps its embedded Human turn
    row = df[df.line == 1255].iloc[0]
    assert row.prompt.endswith("Human: Isn't that drag kings?\n\nAssistant:")
    assert row.rejected.startswith("A drag king is the opposite")
    with pytest.raises(DataFormatError, match=r"harmless-base-test\.jsonl\.gz:87: empty response.*--on-error skip"):
        load_hh(path)


@pytest.mark.parametrize(
    "objective,n_lines,n_loaded,agree,n_identical", [("helpful", 2157, 2155, 1286, 2), ("harmless", 1886, 1882, 1092, 0)]
)
def test_real_relabeled_counts(shared_file, objective, n_lines, n_loaded, agree, n_identical):
    path = shared_file(RELABELED[objective])
    with pytest.warns(DataLoadWarning, match=rf"loaded {n_loaded} of {n_lines} lines; skipped {n_lines - n_loaded} lines"):
        df = load_relabeled(path, on_error="skip")
    rep = df.attrs["load_report"]
    assert (rep.n_lines, rep.n_loaded) == (n_lines, n_loaded)
    assert int(df["llm_agrees"].sum()) == agree
    assert set(df["objective"]) == {objective}
    assert set(df["data_subset"]) == {"helpful", "harmless"}
    raw = [json.loads(x) for x in gzip.open(path, "rt", encoding="utf-8")]
    # the file's chosen/rejected transcripts follow the LLM label, ours the human label
    assert "chosen transcript is not responses[label]" not in rep.notes
    assert len(rep.notes.get("identical responses", [])) == n_identical
    for row in df.itertuples():
        rec = raw[row.line - 1]
        by_llm = row.response_1 if row.llm_label == 1 else row.response_0
        assert rec["chosen"] == join_transcript(row.prompt, by_llm)
        assert row.chosen == rec["responses"][rec["original_label"]]


# --------------------------------------------------------------------------- unreadable bytes and streams
#
# Each of these failed before with a bare EOFError / BadGzipFile / UnicodeDecodeError / RecursionError /
# UnicodeEncodeError / pandas or pyarrow error: no file:line, and on_error="skip" did not help.


def _gz(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def _pref(i: int, **kw) -> str:
    rec = {"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"}
    rec.update(kw)
    return json.dumps(rec)


# one good line per loader, numbered so that the lines differ (and do not compress to nothing)
GOOD_LINE = {
    load_hh: lambda i: _hh(P1, f"It is {i}.", f"Maybe {i * 7}."),
    load_relabeled: lambda i: _relabeled(f"Human: question {i}", f"A{i}", f"B{i}", i % 2, 0),
    load_preference_table: lambda i: _pref(i),
}


def _complete_lines(truncated: bytes) -> int:
    """How many whole lines a truncated gzip stream still holds (decoded independently with zlib)."""
    return zlib.decompressobj(wbits=31).decompress(truncated).count(b"\n")


@pytest.mark.parametrize("loader", list(GOOD_LINE), ids=lambda f: f.__name__)
def test_truncated_gz_names_the_first_lost_line_and_honours_skip(tmp_path, loader):
    full = _gz(tmp_path / "full.jsonl.gz", [GOOD_LINE[loader](i) for i in range(400)]).read_bytes()
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(full[: len(full) // 2])
    k = _complete_lines(path.read_bytes())
    assert 1 < k < 400  # the cut falls inside the data, after line 1
    # raise mode names the first line that could not be read (not line 1)
    with pytest.raises(DataFormatError, match=rf"cut\.jsonl\.gz:{k + 1}: truncated gzip.*--on-error skip"):
        loader(path)
    # skip mode keeps the k whole lines and reports where the file was cut
    with pytest.warns(DataLoadWarning, match=rf"loaded {k} of {k} lines; skipped 1 line: 1 truncated gzip"):
        df = loader(path, on_error="skip")
    assert len(df) == k and df["line"].tolist() == list(range(1, k + 1))
    assert df.attrs["load_report"].skipped == {"truncated gzip, rest of file lost": [k + 1]}


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_gz_name_and_content_must_agree(tmp_path, on_error):
    plain = _write_lines(tmp_path / "plain.jsonl.gz", [_hh(P1, "a", "b")])
    with pytest.raises(DataFormatError, match=r"plain\.jsonl\.gz:1: not a gzip file \(the name ends in \.gz"):
        load_hh(plain, on_error=on_error)
    packed = _gz(tmp_path / "packed.jsonl", [_hh(P1, "a", "b")])
    with pytest.raises(DataFormatError, match=r"packed\.jsonl: gzip-compressed content.*rename it to end in \.gz"):
        load_hh(packed, on_error=on_error)


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_corrupt_gz_is_refused_in_both_modes(tmp_path, on_error):
    # a damaged deflate stream cannot be trusted line by line, so even skip mode stops
    full = bytearray(_gz(tmp_path / "ok.jsonl.gz", [GOOD_LINE[load_hh](i) for i in range(400)]).read_bytes())
    for j in range(len(full) // 2, len(full) // 2 + 64):
        full[j] ^= 0xFF
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(bytes(full))
    # (this damage is found by the CRC check at the end of the stream: before, raise mode blamed the
    # first garbled line as "malformed JSON" and skip mode kept the lines read before the CRC failed)
    with pytest.raises(DataFormatError, match=r"bad\.jsonl\.gz(:\d+)?: corrupt gzip data \(.*cannot be trusted"):
        load_hh(path, on_error=on_error)


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    latin1 = _hh(P1, "cafX", "b").encode().replace(b"cafX", "caf\u00e9".encode("latin-1"))  # a lone 0xe9 byte
    path.write_bytes((_hh(P1, "a", "b") + "\n").encode() + latin1 + b"\n" + (_hh(P1, "c", "d") + "\n").encode())
    with pytest.raises(DataFormatError, match=r"latin1\.jsonl:2: not UTF-8 \(byte 0xe9 at byte \d+ of the line\)"):
        load_hh(path)
    with pytest.warns(DataLoadWarning, match=r"1 not UTF-8 \(line 2\)"):
        df = load_hh(path, on_error="skip")
    assert df["chosen"].tolist() == ["a", "c"] and df["line"].tolist() == [1, 3]


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (_hh(P1, "a", "b") + "\n").encode())
    assert load_hh(path)["chosen"].tolist() == ["a"]


def test_deep_nesting_is_malformed_json_not_recursion_error(tmp_path):
    path = _write_lines(tmp_path / "deep.jsonl", [_hh(P1, "a", "b"), "[" * 100_000 + "]" * 100_000, _hh(P1, "c", "d")])
    with pytest.raises(DataFormatError, match=r"deep\.jsonl:2: malformed JSON \(nested too deeply\)"):
        load_hh(path)
    with pytest.warns(DataLoadWarning):
        df = load_hh(path, on_error="skip")
    assert df["line"].tolist() == [1, 3]
    assert df.attrs["load_report"].skipped == {"malformed JSON": [2]}


@pytest.mark.parametrize("loader", list(GOOD_LINE), ids=lambda f: f.__name__)
def test_lone_surrogates_are_rejected_with_the_field(tmp_path, loader):
    good = GOOD_LINE[loader]
    rec = json.loads(good(2))
    field = {load_hh: "chosen", load_relabeled: "prompt", load_preference_table: "rejected"}[loader]
    rec[field] = rec[field] + " \ud800 tail"  # json.dumps writes the escape "\ud800": valid JSON, not valid Unicode
    paired = json.loads(good(3))
    paired[field] = paired[field] + " \U0001f600"  # a surrogate *pair* (an emoji) is fine
    path = _write_lines(tmp_path / "s.jsonl", [good(1), json.dumps(rec), json.dumps(paired)])
    assert "\\ud800" in path.read_text()
    with pytest.raises(DataFormatError, match=rf"s\.jsonl:2: invalid Unicode \(field '{field}' contains a lone surrogate"):
        loader(path)
    with pytest.warns(DataLoadWarning):
        df = loader(path, on_error="skip")
    assert df["line"].tolist() == [1, 3]
    assert df.attrs["load_report"].skipped == {"invalid Unicode": [2]}
    assert df["prompt"].map(lambda t: t.encode("utf-8")).map(len).min() > 0  # every kept text encodes


def test_csv_ragged_rows_name_their_line_and_honour_skip(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("prompt,chosen,rejected\np1,c1,r1\np2,c2,r2,extra,more\np3,c3\np4,c4,r4\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"t\.csv:3: wrong number of fields \(expected 3 as in the header, got 5\)"):
        load_preference_table(path)
    with pytest.warns(DataLoadWarning, match=r"skipped 2 lines: 2 wrong number of fields \(lines 3, 4\)"):
        df = load_preference_table(path, on_error="skip")
    assert df["prompt"].tolist() == ["p1", "p4"] and df["line"].tolist() == [2, 5]


def test_csv_line_numbers_count_multiline_fields(tmp_path):
    # HH prompts contain newlines, so a CSV record spans several lines; errors name the record's first line
    table = pd.DataFrame({"prompt": [P1 + "\n\nAssistant:", "\n\nHuman: x\n\nAssistant:", "p"],
                          "chosen": ["ok", "  ", "fine"], "rejected": ["no", "bad", "worse"]})
    path = save_preference_table(table, tmp_path / "t.csv")
    # header on line 1; row 1 starts on line 2 and spans its prompt's 8 newlines; row 2 has 4
    assert (table["prompt"][0].count("\n"), table["prompt"][1].count("\n")) == (8, 4)
    with pytest.raises(DataFormatError, match=r"t\.csv:11: empty response \(column 'chosen'\)"):
        load_preference_table(path)
    with pytest.warns(DataLoadWarning, match=r"empty response \(line 11\)"):
        df = load_preference_table(path, on_error="skip")
    assert df["line"].tolist() == [2, 16]
    assert df["prompt"].tolist() == [table["prompt"][0], "p"]


def test_csv_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"prompt,chosen,rejected\np1,c1,r1\np2,caf\xe9,r2\np3,c3,r3\n")
    with pytest.raises(DataFormatError, match=r"t\.csv:3: not UTF-8 \(column 'chosen' has byte 0xe9"):
        load_preference_table(path)
    with pytest.warns(DataLoadWarning):
        df = load_preference_table(path, on_error="skip")
    assert df["line"].tolist() == [2, 4]


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_empty_or_headerless_csv_and_garbage_parquet(tmp_path, on_error):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(DataFormatError, match=r"empty\.csv: empty CSV file \(no header line\)"):
        load_preference_table(empty, on_error=on_error)
    header = tmp_path / "header.csv"
    header.write_text("prompt,chosen,rejected\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"header\.csv: no data lines"):
        load_preference_table(header, on_error=on_error)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not a parquet file" * 10)
    with pytest.raises(DataFormatError, match=r"garbage\.parquet: not a readable parquet file \(ArrowInvalid: .*magic"):
        load_preference_table(garbage, on_error=on_error)
    ok = save_preference_table(_table(), tmp_path / "ok.parquet").read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(ok[: len(ok) // 2])
    with pytest.raises(DataFormatError, match=r"cut\.parquet: not a readable parquet file"):
        load_preference_table(cut, on_error=on_error)


# --------------------------------------------------------------------------- empty tables and preference types


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".csv", ".parquet"])
def test_empty_table_is_a_clear_error(tmp_path, suffix):
    # before: an empty .jsonl gave a frame with only a "line" column
    path = save_preference_table(_table().iloc[:0], tmp_path / f"empty{suffix}")
    with pytest.raises(DataFormatError, match=rf"empty{suffix.replace('.', '[.]')}: no data lines"):
        load_preference_table(path)


@pytest.mark.parametrize("loader", list(GOOD_LINE), ids=lambda f: f.__name__)
def test_empty_file_is_a_clear_error_in_every_loader(tmp_path, loader):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"empty\.jsonl: no data lines"):
        loader(path, on_error="skip")


@pytest.mark.parametrize("loader", list(GOOD_LINE), ids=lambda f: f.__name__)
def test_every_line_skipped_is_a_clear_error(tmp_path, loader):
    path = _write_lines(tmp_path / "bad.jsonl", ["{not json", "[1, 2]"])
    with pytest.raises(DataFormatError, match=r"bad\.jsonl: loaded 0 of 2 lines; skipped 2 lines: 2 malformed JSON "
                       r"\(lines 1, 2\); nothing usable"):
        loader(path, on_error="skip")


def test_skipped_first_line_does_not_change_the_schema(tmp_path):
    # the frame's columns come from every line read, whatever the first line held
    path = _write_lines(tmp_path / "t.jsonl", ["{oops", _pref(1, chosen_preference=0.5)])
    with pytest.warns(DataLoadWarning):
        df = load_preference_table(path, on_error="skip")
    assert list(df.columns) == ["prompt", "chosen", "rejected", "chosen_preference", "line"]


@pytest.mark.parametrize(
    "value,detail",
    [("0.5", "is the string '0.5'"), (True, "is the boolean True"), (None, "is missing"),
     ([0.5], "is a list"), (float("nan"), "is NaN"), (1.5, "= 1.5 is outside")],
)
def test_preference_must_be_a_number_in_unit_interval(tmp_path, value, detail):
    path = _write_lines(tmp_path / "t.jsonl", [_pref(1, chosen_preference=0.2), _pref(2, chosen_preference=value)])
    with pytest.raises(DataFormatError, match=rf"t\.jsonl:2: bad preference \(column 'chosen_preference' "
                       rf"{detail}.*need a number in \[0, 1\]"):
        load_preference_table(path)
    with pytest.warns(DataLoadWarning):
        df = load_preference_table(path, on_error="skip")
    assert df["chosen_preference"].tolist() == [0.2] and df["chosen_preference"].dtype == np.float64


def test_bool_and_string_preferences_rejected_in_parquet_and_csv(tmp_path):
    t = _table()
    t["chosen_preference"] = [True, False]
    path = save_preference_table(t, tmp_path / "b.parquet")
    with pytest.raises(DataFormatError, match=r"b\.parquet:1: bad preference \(column 'chosen_preference' is the boolean"):
        load_preference_table(path)
    path = save_preference_table(t, tmp_path / "b.csv")  # pandas would read True/False as a bool column
    with pytest.raises(DataFormatError, match=r"b\.csv:2: bad preference \(column 'chosen_preference' is the string 'True'"):
        load_preference_table(path)
    t["chosen_preference"] = ["0.9", "0.6"]
    path = save_preference_table(t, tmp_path / "s.parquet")
    with pytest.raises(DataFormatError, match=r"s\.parquet:1: bad preference \(column 'chosen_preference' is the string '0\.9'"):
        load_preference_table(path)


def test_integer_preferences_and_text_that_looks_numeric_round_trip(tmp_path):
    t = pd.DataFrame({"prompt": ["1", "2"], "chosen": ["42", "7"], "rejected": ["0", "3"], "chosen_preference": [1, 0]})
    for suffix in (".jsonl", ".csv", ".parquet"):
        back = load_preference_table(save_preference_table(t, tmp_path / f"t{suffix}"))
        assert back["chosen"].tolist() == ["42", "7"], suffix
        assert back["chosen_preference"].tolist() == [1.0, 0.0] and back["chosen_preference"].dtype == np.float64


# --------------------------------------------------------------------------- reporting skipped lines


def test_raise_hint_names_python_argument_and_cli_flag(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", ["{not json"])
    with pytest.raises(DataFormatError) as e:
        load_hh(path)
    assert "on_error='skip'" in str(e.value) and "--on-error skip" in str(e.value)


def test_clean_load_warns_nothing_and_summary_caps_line_lists(tmp_path):
    good = _write_lines(tmp_path / "good.jsonl", [_hh(P1, "a", "b")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_hh(good)
    many = _write_lines(tmp_path / "many.jsonl", ["{x"] * 12 + [_hh(P1, "a", "b")])
    with pytest.warns(DataLoadWarning, match=r"skipped 12 lines: 12 malformed JSON \(lines 1, 2, 3, 4, 5, 6, 7, 8, \.\.\.\)"):
        load_hh(many, on_error="skip")


def test_repaired_lines_warn_in_raise_mode_too(tmp_path):
    chosen = P1 + "\n\nAssistant: Let me think.\n\nHuman: ok\n\nAssistant: It is 4."
    path = _write_lines(tmp_path / "mm.jsonl", [json.dumps({"chosen": chosen, "rejected": P1 + "\n\nAssistant: Five."})])
    with pytest.warns(DataLoadWarning, match=r"repaired 1 line: 1 prompt mismatch cut at shared prompt \(line 1\)"):
        load_hh(path)


def test_print_load_warnings_prints_one_plain_line(tmp_path, capsys):
    path = _write_lines(tmp_path / "bad.jsonl", ["{x", _hh(P1, "a", "b")])
    with pytest.warns(UserWarning) as record:
        with print_load_warnings("vrpo demo"):
            load_hh(path, on_error="skip")
            load_hh(path, on_error="skip")  # every load is shown, not once per location
            warnings.warn("unrelated", UserWarning)
    err = capsys.readouterr().err
    line = f"vrpo demo: data: {path}: loaded 1 of 2 lines; skipped 1 line: 1 malformed JSON (line 1)"
    assert err.count(line + "\n") == 2 and err.count("\n") == 2
    # other warnings take their usual route (here: pytest's recorder)
    assert [str(w.message) for w in record] == ["unrelated"]


def _relabeled_dir(root: Path, lines: list[str]) -> Path:
    d = root / "relabeled-hh-rlhf" / "harmless"
    d.mkdir(parents=True)
    _gz(d / "test.jsonl.gz", lines)
    return root


def test_cli_hh_reward_prints_the_skip_summary(tmp_path, monkeypatch, capsys):
    """`vrpo hh-reward` shows the loader's summary on the console (the experiment itself is stubbed)."""
    from llm import hh_reward
    from vrpo_cli.main import main

    lines = [_relabeled("Human: hi", "A", "B", 1, 1), _relabeled("Human: z", " ", "b", 0, 0), "{oops"]
    data = _relabeled_dir(tmp_path / "data", lines)

    def fake_run(cfg):
        df = load_relabeled(cfg.relabeled_path("harmless"), on_error=cfg.on_error)
        return {"rows": [], "timing": {"total_s": 0.0, "load_and_embed_s": 0.0}, "n": len(df)}

    monkeypatch.setattr(hh_reward, "run", fake_run)
    assert main(["hh-reward", "--smoke", "--data-dir", str(data), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert ("vrpo hh-reward: data: " + str(data / "relabeled-hh-rlhf" / "harmless" / "test.jsonl.gz")
            + ": loaded 1 of 3 lines; skipped 2 lines: 1 empty response (line 2), 1 malformed JSON (line 3)") in err


def test_cli_hh_reward_raise_mode_names_line_and_flag(tmp_path, capsys):
    from vrpo_cli.main import main

    data = _relabeled_dir(tmp_path / "data", [_relabeled("Human: hi", "A", "B", 1, 1), "{oops"])
    assert main(["hh-reward", "--smoke", "--data-dir", str(data), "--no-progress", "--on-error", "raise"]) == 2
    err = capsys.readouterr().err
    assert "test.jsonl.gz:2: malformed JSON" in err and "--on-error skip" in err
