"""vrpo_common.fileio: atomic writes (target only on success, umask mode, no leftovers)."""

import os
import stat

import pytest

from vrpo_common.fileio import atomic_path, umask_mode


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_umask_mode_is_plain_open_mode(tmp_path, umask_027):
    assert umask_mode() == 0o640
    assert os.umask(0o027) == 0o027  # umask_mode left the umask as it was
    plain = tmp_path / "plain.txt"
    with open(plain, "w") as fh:
        fh.write("x")
    assert _mode(plain) == umask_mode() == 0o640


def test_target_appears_only_on_success_with_umask_mode(tmp_path, umask_027):
    target = tmp_path / "out.json"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith("out.json.") and tmp.name.endswith(".tmp")
        assert tmp.exists() and not target.exists()
        tmp.write_text("new")
        assert not target.exists()
    assert target.read_text() == "new"
    assert _mode(target) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_suffix_keeps_extension_last(tmp_path):
    with atomic_path(tmp_path / "fig.png", suffix=".png") as tmp:
        assert tmp.name.startswith("fig.png.") and tmp.name.endswith(".tmp.png")
        tmp.write_bytes(b"\x89PNG")
    assert (tmp_path / "fig.png").read_bytes() == b"\x89PNG"
    assert len(list(tmp_path.iterdir())) == 1


def test_replaces_existing_target(tmp_path):
    target = tmp_path / "t.txt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("exc", [ValueError, KeyboardInterrupt])
def test_exception_leaves_existing_target_and_no_tmp(tmp_path, exc):
    target = tmp_path / "t.txt"
    target.write_text("old")
    with pytest.raises(exc):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise exc("boom")
    assert target.read_text() == "old"
    assert not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_exception_creates_no_target(tmp_path):
    target = tmp_path / "t.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_tmp_removed_by_writer_is_fine_on_error(tmp_path):
    with pytest.raises(OSError):
        with atomic_path(tmp_path / "t.txt") as tmp:
            tmp.unlink()
            raise OSError
    assert list(tmp_path.iterdir()) == []


def test_parent_directory_is_created(tmp_path):
    target = tmp_path / "a" / "b" / "c.txt"
    with atomic_path(str(target)) as tmp:
        assert tmp.parent == target.parent and target.parent.is_dir()
        tmp.write_text("x")
    assert target.read_text() == "x"
    assert [p.name for p in target.parent.iterdir()] == ["c.txt"]
