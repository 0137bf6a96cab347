"""Fuzz the loaders of llm.data: random byte edits and truncations give good rows or a DataFormatError."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="needs hypothesis (the 'test' extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from llm.data import (  # noqa: E402
    PREFERENCE_COLUMNS,
    DataFormatError,
    DataLoadWarning,
    load_hh,
    load_preference_table,
    load_relabeled,
    save_preference_table,
)

P1 = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?"


def _hh_line(i: int) -> str:
    return json.dumps({"chosen": f"{P1}\n\nAssistant: It is {i}.", "rejected": f"{P1}\n\nAssistant: Maybe {i * 7}."})


def _relabeled_line(i: int) -> str:
    return json.dumps({"prompt": f"Human: question {i}", "responses": [f"A{i}", f"B{i}"], "original_label": i % 2,
                       "label": 0, "objective": "helpful", "data_subset": "harmless", "Index": i})


def _table_line(i: int) -> str:
    return json.dumps({"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}", "chosen_preference": 0.1 * i})


def _table() -> pd.DataFrame:
    return pd.DataFrame({"prompt": ["p1", "p2"], "chosen": ["c1", "c2"], "rejected": ["r1", "r2"], "a_1": ["x", "y"],
                         "chosen_preference": [0.9, 0.6], "a_1_preference": [0.3, 0.5]})


_FUZZ_LOADERS = {"hh": load_hh, "relabeled": load_relabeled, "table": load_preference_table}


def _fuzz_source(kind: str, suffix: str, tmp: Path) -> bytes:
    if kind == "table" and suffix in (".csv", ".parquet"):
        return save_preference_table(_table(), tmp / f"src{suffix}").read_bytes()
    lines = [{"hh": _hh_line, "relabeled": _relabeled_line, "table": _table_line}[kind](i) for i in range(6)]
    text = ("\n".join(lines) + "\n").encode()
    return gzip.compress(text, mtime=0) if suffix.endswith(".gz") else text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    case=st.sampled_from([("hh", ".jsonl"), ("hh", ".jsonl.gz"), ("relabeled", ".jsonl"), ("table", ".jsonl"),
                          ("table", ".jsonl.gz"), ("table", ".csv"), ("table", ".parquet")]),
    edits=st.lists(st.tuples(st.floats(0, 1), st.binary(min_size=0, max_size=4), st.integers(0, 3)), max_size=4),
    cut=st.one_of(st.none(), st.floats(0, 1)),
    on_error=st.sampled_from(["raise", "skip"]),
)
def test_damaged_files_give_a_frame_or_a_data_format_error(tmp_path, case, edits, cut, on_error):
    """Random byte edits and truncations: a loader returns good rows or raises DataFormatError, nothing else."""
    kind, suffix = case
    data = bytearray(_fuzz_source(kind, suffix, tmp_path))
    for where, new, n_del in edits:  # replace n_del bytes at a relative position by `new`
        i = int(where * len(data))
        data[i:i + n_del] = new
    if cut is not None:
        data = data[: int(cut * len(data))]
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataLoadWarning)
        try:
            df = _FUZZ_LOADERS[kind](path, on_error=on_error)
        except DataFormatError as e:
            assert str(e).startswith(str(path)), e
            return
    assert len(df) > 0 and df["line"].is_monotonic_increasing
    for c in ("prompt", "chosen", "rejected"):
        assert all(isinstance(t, str) and t.encode("utf-8") for t in df[c]), c
    for c in set(df.columns) & set(PREFERENCE_COLUMNS):  # (a damaged key is just an extra column)
        assert df[c].dtype == np.float64 and df[c].between(0, 1).all()
