"""Atomic writes: a failed write leaves what was there before, and nothing it created itself."""

from __future__ import annotations

import pytest

from dorakit import atomic


def test_a_failed_write_removes_the_directories_it_created(tmp_path):
    (tmp_path / "kept").mkdir()

    def fail(path):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_files(tmp_path / "kept" / "new" / "adapter", {"a.bin": fail}, marker="a.bin")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"]


def test_a_failed_write_keeps_a_directory_that_existed(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "notes.txt").write_text("mine")

    def fail(path):
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic.write_files(tmp_path / "adapter", {"a.bin": fail}, marker="a.bin")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["notes.txt"]
