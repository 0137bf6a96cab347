"""Loaders in llm.data: round trips, bad-input errors, and the split on real HH transcripts."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from llm.data import (
    DataFormatError,
    join_transcript,
    last_turns,
    load_hh,
    load_preference_table,
    load_relabeled,
    relabeled_to_preference_table,
    save_preference_table,
    split_transcript,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_FILE = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
RELABELED = {o: SHARED_DATA / "relabeled-hh-rlhf" / o / "test.jsonl.gz" for o in ("helpful", "harmless")}


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (expected ../shared/data beside the repository)")


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
    df = load_hh(path, on_error="skip")
    assert df["chosen"].tolist() == ["ok", "good"]
    rep = df.attrs["load_report"]
    assert rep.n_lines == 7 and rep.n_loaded == 2 and rep.n_skipped == 5
    assert rep.skipped == {"malformed JSON": [2], "missing field": [3], "wrong field type": [4],
                           "empty response": [5], "no Assistant turn": [6]}
    assert "loaded 2 of 7 lines" in rep.summary()


def test_load_hh_prompt_mismatch_policies(tmp_path):
    # the chosen response itself contains an Assistant turn: the naive splits disagree
    chosen = P1 + "\n\nAssistant: Let me think.\n\nHuman: ok\n\nAssistant: It is 4."
    rejected = P1 + "\n\nAssistant: Five."
    path = _write_lines(tmp_path / "mm.jsonl", [json.dumps({"chosen": chosen, "rejected": rejected}), _hh(P1, "a", "b")])
    df = load_hh(path)
    assert df["prompt"].iloc[0] == P1 + "\n\nAssistant:"
    assert df["chosen"].iloc[0] == "Let me think.\n\nHuman: ok\n\nAssistant: It is 4."
    assert df["rejected"].iloc[0] == "Five."
    assert df.attrs["load_report"].repaired == {"prompt mismatch cut at shared prompt": [1]}
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


def test_real_hh_split_round_trips_and_reports_mismatches():
    _need(HH_FILE)
    df = load_hh(HH_FILE, on_error="skip")
    rep = df.attrs["load_report"]
    # 2,312 lines (data README); 4 have an empty final response; 5 split at different prompts
    assert rep.n_lines == 2312
    assert rep.skipped == {"empty response": [87, 517, 926, 1104]}
    assert rep.repaired == {"prompt mismatch cut at shared prompt": [1255, 1689, 1951, 1953, 2037]}
    assert len(df) == 2308
    assert df["prompt"].str.endswith("\n\nAssistant:").all()
    raw = [json.loads(x) for x in gzip.open(HH_FILE, "rt", encoding="utf-8")]
    for row in df.itertuples():
        assert join_transcript(row.prompt, row.chosen) == raw[row.line - 1]["chosen"]
        assert join_transcript(row.prompt, row.rejected) == raw[row.line - 1]["rejected"]
    # a repaired line: the chosen continuation keeps its embedded Human turn
    row = df[df.line == 1255].iloc[0]
    assert row.prompt.endswith("Human: Isn't that drag kings?\n\nAssistant:")
    assert row.rejected.startswith("A drag king is the opposite")
    with pytest.raises(DataFormatError, match=r"harmless-base-test\.jsonl\.gz:87: empty response"):
        load_hh(HH_FILE)


@pytest.mark.parametrize(
    "objective,n_lines,n_loaded,agree,n_identical", [("helpful", 2157, 2155, 1286, 2), ("harmless", 1886, 1882, 1092, 0)]
)
def test_real_relabeled_counts(objective, n_lines, n_loaded, agree, n_identical):
    path = RELABELED[objective]
    _need(path)
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
