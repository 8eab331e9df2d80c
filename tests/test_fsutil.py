"""migsec.fsutil: atomic, durable replacement of a file on a real file system."""
from __future__ import annotations

import os
import stat

import pytest

from migsec.fsutil import atomic_write, fsync_dir


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_replaces_content_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    atomic_write(target, b"new" * 100_000, mode=0o600)
    assert target.read_bytes() == b"new" * 100_000
    assert mode_of(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_mode_follows_umask_unless_told_otherwise(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "masked", b"x", mode=0o644)
        atomic_write(tmp_path / "exact", b"x", mode=0o644, umask=False)
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "masked") == 0o640
    assert mode_of(tmp_path / "exact") == 0o644


def test_no_overwrite_refuses_an_existing_file(tmp_path):
    target = tmp_path / "key.pem"
    atomic_write(target, b"first", overwrite=False)
    with pytest.raises(FileExistsError):
        atomic_write(target, b"second", overwrite=False)
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.pem"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "users.json"
    target.write_bytes(b"old")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.json"]


def test_a_symlink_at_the_temp_name_is_not_followed(tmp_path):
    target, elsewhere = tmp_path / "peers.json", tmp_path / "elsewhere"
    elsewhere.write_bytes(b"untouched")
    (tmp_path / f".peers.json.{os.getpid()}.tmp").symlink_to(elsewhere)
    with pytest.raises(OSError):
        atomic_write(target, b"data")
    assert elsewhere.read_bytes() == b"untouched" and not target.exists()


def test_fsync_dir_needs_a_directory(tmp_path):
    fsync_dir(tmp_path)
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        fsync_dir(tmp_path / "f")
