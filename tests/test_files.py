"""recsvc._files: a file is replaced whole or not at all, keeping its permissions."""

from __future__ import annotations

import os

import pytest

from recsvc._files import atomic_write, replacing


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f.json"
    path.write_bytes(b"old")

    def half(fh):
        fh.write(b"new, but")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, half)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.json"]


def test_the_new_file_keeps_the_old_mode_or_is_readable(tmp_path):
    old = tmp_path / "old.bin"
    old.write_bytes(b"x")
    old.chmod(0o640)
    atomic_write(old, lambda fh: fh.write(b"y"))
    assert old.read_bytes() == b"y" and old.stat().st_mode & 0o777 == 0o640
    new = tmp_path / "new.bin"
    with replacing(new) as tmp:  # writers that need a name
        tmp.write_bytes(b"z")
    assert new.read_bytes() == b"z" and new.stat().st_mode & 0o777 == 0o644
    assert sorted(os.listdir(tmp_path)) == ["new.bin", "old.bin"]
