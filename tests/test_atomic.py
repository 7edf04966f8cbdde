"""The one atomic write: contents in place with umask permissions, or nothing changed."""

from __future__ import annotations

import os
import stat

import pytest

from uniportrait.atomic import atomic_directory, atomic_path, write_bytes_atomic, write_text_atomic


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_writes_create_the_folder_and_follow_the_umask(tmp_path, umask_027):
    text = write_text_atomic(tmp_path / "a" / "b" / "notes.md", "héllo\n")
    data = write_bytes_atomic(tmp_path / "c" / "blob.bin", b"\x00\x01")
    assert text.read_text(encoding="utf-8") == "héllo\n" and data.read_bytes() == b"\x00\x01"
    assert _mode(text) == umask_027 and _mode(data) == umask_027
    assert sorted(p.name for p in text.parent.iterdir()) == ["notes.md"]


def test_atomic_path_replaces_an_existing_file(tmp_path, umask_027):
    target = tmp_path / "state.json"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".state.json.") and tmp.exists()
        assert target.read_text() == "old"  # nothing visible until the block ends
        tmp.write_text("new")
    assert target.read_text() == "new" and _mode(target) == umask_027
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failure_in_the_block_leaves_the_old_file_and_no_temp_file(tmp_path, error):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    with pytest.raises(type(error)), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise error
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_a_failed_rename_leaves_no_temp_file(tmp_path):
    target = tmp_path / "folder"
    (target / "inside").mkdir(parents=True)  # os.replace cannot put a file over a non-empty folder
    with pytest.raises(OSError):
        write_bytes_atomic(target, b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["folder"] and (target / "inside").is_dir()


def test_fsync_is_skipped_only_when_asked(tmp_path, monkeypatch):
    import os

    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    write_bytes_atomic(tmp_path / "bulk.bin", b"1", durable=False)
    assert synced == [] and (tmp_path / "bulk.bin").read_bytes() == b"1"
    write_bytes_atomic(tmp_path / "index.json", b"2")
    assert len(synced) == 1


def test_atomic_directory_replaces_the_whole_folder(tmp_path):
    target = tmp_path / "models" / "adapter"
    target.mkdir(parents=True)
    (target / "stale.bin").write_bytes(b"old")
    with atomic_directory(target) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir()) and tmp.parent.parent == target.parent
        (tmp / "config.json").write_text("{}")
        (tmp / "sub").mkdir()
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "sub"]  # stale.bin is gone
    assert sorted(p.name for p in target.parent.iterdir()) == ["adapter"]  # no staging left


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_a_failure_while_filling_a_folder_leaves_the_old_one(tmp_path, error):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(error):
        with atomic_directory(target) as tmp:
            (tmp / "config.json").write_text("new, half")
            raise error()
    assert (target / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "config.json").write_text("old")
    real = os.replace

    def failing(src, dst):
        if str(src).endswith("new"):
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk gone"):
        with atomic_directory(target) as tmp:
            (tmp / "config.json").write_text("new")
    assert (target / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
