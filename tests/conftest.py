"""Fixtures shared by the test modules: the real-data directory and one embedding cache per session.

- ``shared_data``: the directory of real preference data described in
  ``../shared/data/README.md`` (beside the repository; ``$VRPO_SHARED_DATA`` overrides
  it). Tests that need it skip, naming the path they looked at, when it is absent.
- ``shared_file``: ``shared_file("hh-rlhf/harmless-base-test.jsonl.gz")`` is that
  file's path, or a skip naming the missing file.
- ``embedding_cache``: one directory for :func:`llm.features.embed_texts` caches,
  shared by every test of the session, so texts embedded by one test are read from
  disk by the next. ``$VRPO_TEST_EMBEDDING_CACHE`` keeps it between sessions (e.g.
  a developer's machine); by default it is a fresh temporary directory, so a test
  session never reads embeddings made by other code. Tests that check cold-cache
  behaviour use their own ``tmp_path`` instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data_dir() -> Path:
    """``$VRPO_SHARED_DATA`` if set, else ``../shared/data`` beside the repository."""
    env = os.environ.get("VRPO_SHARED_DATA")
    return Path(env) if env else DEFAULT_SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data directory; skips (naming the path) when it is absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (expected ../shared/data beside the repository, "
                    "or set VRPO_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def shared_file(shared_data):
    """``shared_file(relative_path) -> Path`` inside ``shared_data``; skips, naming the file, when absent."""

    def get(relative: str) -> Path:
        path = shared_data / relative
        if not path.exists():
            pytest.skip(f"shared data file not found: {path} (see ../shared/data/README.md)")
        return path

    return get


@pytest.fixture(scope="session")
def embedding_cache(tmp_path_factory) -> Path:
    """One embedding-cache directory for the whole session (``$VRPO_TEST_EMBEDDING_CACHE`` to keep it)."""
    env = os.environ.get("VRPO_TEST_EMBEDDING_CACHE")
    if env:
        path = Path(env)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("embeddings")


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch intra-op thread for a module's tiny models (fastest, and much faster on a loaded
    machine); the previous count is restored after the module. Use with
    ``pytestmark = pytest.mark.usefixtures("torch_one_thread")``."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
