"""Atomic file writes (stdlib only), shared by :mod:`sim`, :mod:`llm` and :mod:`analysis`.

Write to the temporary path that :func:`atomic_path` yields; on success it becomes
the target, with the mode a plain ``open(path, "w")`` would give::

    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(text)

Readers never see a partial target: an exception inside the block (including
``KeyboardInterrupt``) removes the temporary file and leaves the target as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "umask_mode"]


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
