"""Atomic file writes (data_prep/atomic.py), on the real file system."""

from __future__ import annotations

import json
import os
import stat

import pytest

from data_prep import atomic
from megatron_ipt.manifest import atomic_write_text


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_each_writer_writes_the_exact_content_and_leaves_no_temporary_file(tmp_path):
    atomic.write_bytes(tmp_path / "a.bin", b"\x00\xffdata")
    atomic.write_text(tmp_path / "b.txt", "héllo\r\nworld\n")
    atomic.write_json(tmp_path / "c.json", {"b": 1, "a": "é"}, indent=2, sort_keys=True)
    n = atomic.write_jsonl(tmp_path / "sub" / "d.jsonl", ({"i": i, "t": "é"} for i in range(3)))
    atomic_write_text(tmp_path / "e.txt", "ünïcode\n")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\xffdata"
    assert (tmp_path / "b.txt").read_bytes() == "héllo\r\nworld\n".encode()  # newlines untranslated
    assert (tmp_path / "c.json").read_text(encoding="utf-8") == json.dumps({"b": 1, "a": "é"}, indent=2, sort_keys=True) + "\n"
    assert n == 3
    assert (tmp_path / "sub" / "d.jsonl").read_bytes() == "".join(
        json.dumps({"i": i, "t": "é"}, ensure_ascii=False) + "\n" for i in range(3)).encode()
    assert (tmp_path / "e.txt").read_bytes() == "ünïcode\n".encode()
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "sub") == []


def test_a_rewrite_replaces_the_whole_old_content(tmp_path):
    path = tmp_path / "f.json"
    atomic.write_json(path, {"k": "x" * 1000})
    atomic.write_json(path, {"k": 1})
    assert json.loads(path.read_text()) == {"k": 1} and _leftovers(tmp_path) == []


def test_an_exception_mid_write_keeps_the_old_file_and_removes_the_temporary_file(tmp_path):
    path = tmp_path / "out.jsonl"
    atomic.write_jsonl(path, [{"old": True}])

    def records():
        yield {"new": 1}
        raise RuntimeError("generator failed")

    with pytest.raises(RuntimeError, match="generator failed"):
        atomic.write_jsonl(path, records())
    with pytest.raises(TypeError):  # not JSON-serialisable, after a first good line
        atomic.write_jsonl(path, [{"new": 1}, {"bad": object()}])
    with pytest.raises(KeyboardInterrupt):
        with atomic.open_atomic(path, "wb") as f:
            f.write(b"partial")
            raise KeyboardInterrupt
    assert path.read_text() == '{"old": true}\n'
    assert _leftovers(tmp_path) == []


def test_a_failed_first_write_leaves_no_file_at_all(tmp_path):
    with pytest.raises(TypeError):
        atomic.write_json(tmp_path / "never.json", {"bad": {1, 2}})
    assert list(tmp_path.iterdir()) == []


def test_new_files_get_umask_permissions_not_private_temp_file_ones(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "p.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "p.txt").stat().st_mode) == 0o644


def test_open_atomic_rejects_modes_other_than_write(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic.open_atomic(tmp_path / "x", "ab"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_exchange_swaps_two_folders_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "new.txt").write_text("new")
    (b / "old.txt").write_text("old")
    assert atomic.exchange(a, b)  # Linux renameat2(RENAME_EXCHANGE) on the test's file system
    assert [p.name for p in b.iterdir()] == ["new.txt"]
    assert [p.name for p in a.iterdir()] == ["old.txt"]


def test_exchange_with_a_missing_path_raises_and_changes_nothing(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    with pytest.raises(FileNotFoundError):
        atomic.exchange(a, tmp_path / "missing")
    assert a.is_dir() and not (tmp_path / "missing").exists()


def test_replace_dir_puts_the_new_folder_in_place_and_removes_the_old_one(tmp_path):
    final, new = tmp_path / "out", tmp_path / ".out.tmp"
    new.mkdir()
    (new / "a.txt").write_text("first")
    atomic.replace_dir(new, final)  # nothing there yet: a plain rename
    assert (final / "a.txt").read_text() == "first" and not new.exists()
    new.mkdir()
    (new / "b.txt").write_text("second")
    atomic.replace_dir(new, final)
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the previous content is gone, no leftovers
