"""Atomic file writes and the one JSON encoder, shared by :mod:`sim`, :mod:`llm` and :mod:`analysis`.

Write to the temporary path that :func:`atomic_path` yields; on success it becomes
the target, with the mode a plain ``open(path, "w")`` would give::

    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(text)

Readers never see a partial target: an exception inside the block (including
``KeyboardInterrupt``) removes the temporary file and leaves the target as it was.
:func:`write_text`, :func:`write_json`, :func:`save_figure`, :func:`torch_save` and
:func:`write_table` (a pandas table with its configuration embedded; read back by
:func:`read_results`) are the usual writes on top of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_path", "umask_mode", "write_text", "write_json", "json_default", "save_figure", "torch_save",
           "write_table", "read_results"]


def umask_mode() -> int:
    """``0o666`` minus the process umask: the mode a plain ``open(..., "w")`` would give."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on normal exit move it onto ``path``.

    The parent directory is created. The temporary name starts with the target's
    name and ends in ``".tmp" + suffix`` (pass e.g. ``suffix=".png"`` to writers
    that infer the format from the extension). On normal exit the file is
    chmod-ed to :func:`umask_mode` and ``os.replace``-d onto ``path``; on any
    exception it is removed and the exception re-raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp" + suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def json_default(o: Any):
    """``json.dumps(default=...)`` hook: NumPy scalars and arrays, booleans and paths."""
    import numpy as np

    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, **kw) -> Path:
    """``json.dumps(obj, default=json_default, **kw)`` written atomically; return the path."""
    return write_text(path, json.dumps(obj, default=json_default, **kw))


def save_figure(fig, path: str | os.PathLike, **kw) -> Path:
    """``fig.savefig`` atomically, the format taken from ``path``'s suffix; return the path."""
    path = Path(path)
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, format=path.suffix[1:], **kw)
    return path


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically (a crash never leaves a truncated checkpoint); return the path.

    Save only tensors, containers and plain values, so the file loads with
    ``torch.load(path, weights_only=True)``.
    """
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


# --------------------------------------------------------------------------- tables with their configuration


def write_table(df, path, meta: dict) -> None:
    """Atomically write ``df`` with ``meta`` embedded (parquet metadata or CSV ``#`` header)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        blob = json.dumps(meta, sort_keys=True, default=json_default)
        if path.suffix == ".csv":
            with open(tmp, "w") as f:
                for line in blob.splitlines() or [blob]:
                    f.write(f"# vrpo_config: {line}\n")
                df.to_csv(f, index=False)
        elif path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(df, preserve_index=False)
            md = dict(table.schema.metadata or {})
            md[b"vrpo_config"] = blob.encode()
            pq.write_table(table.replace_schema_metadata(md), tmp)
        else:
            raise ValueError(f"results file must end in .parquet or .csv, got {path}")



def read_results(path) -> tuple:
    """Read a results table and its embedded metadata (``{"config": ..., ...}``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"results file not found: {path}")
    if path.suffix == ".csv":
        lines = []
        with open(path) as f:
            for line in f:
                if not line.startswith("# vrpo_config: "):
                    break
                lines.append(line[len("# vrpo_config: "):].rstrip("\n"))
        meta = json.loads("\n".join(lines)) if lines else {}
        import pandas as pd

        return pd.read_csv(path, comment=None, skiprows=len(lines)), meta
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(b"vrpo_config")
    return table.to_pandas(), (json.loads(raw) if raw else {})
