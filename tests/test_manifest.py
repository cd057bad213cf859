import hashlib
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ipt.manifest import ManifestError, atomic_dir, fingerprint, is_done, read_manifest, write_manifest


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    final = tmp_path / "stage"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as out:
            (out / "half.jsonl").write_text("{}\n")
            raise RuntimeError("crash mid-stage")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_previous_output(tmp_path):
    final = tmp_path / "stage"
    final.mkdir()
    (final / "old.txt").write_text("old")
    write_manifest(final, stage="format", fingerprint="old", config={})  # only a finished stage folder is replaced
    with atomic_dir(final, "format") as out:
        (out / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]


def test_a_replaced_stage_folder_is_never_missing_for_a_reader(tmp_path):
    """The previous output is swapped out in one step (renameat2): a reader polling while the stage is redone
    100 times always finds the folder and a complete file in it."""
    import threading

    final = tmp_path / "stage"
    with atomic_dir(final) as out:
        (out / "data.txt").write_text("0")
        (out / "manifest.json").write_text('{"stage": "s"}')
    missing, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            try:
                (final / "data.txt").read_text()
            except FileNotFoundError as e:
                missing.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(1, 101):
            with atomic_dir(final) as out:
                (out / "data.txt").write_text(str(i))
                (out / "manifest.json").write_text('{"stage": "s"}')
    finally:
        stop.set()
        reader.join()
    assert missing == []
    assert (final / "data.txt").read_text() == "100"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]


_CHILD = """
import os, sys, time
from megatron_ipt.manifest import atomic_dir
with atomic_dir(sys.argv[1]) as out:
    (out / "half.jsonl").write_text("{}\\n")
    print(out, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), 9)
    time.sleep(60)
"""


def test_atomic_dir_removes_what_a_killed_process_of_this_host_left(tmp_path):
    final = tmp_path / "stage"
    killed = subprocess.run([sys.executable, "-c", _CHILD, str(final), "kill"], capture_output=True, text=True)
    assert killed.returncode == -9
    left = tmp_path / killed.stdout.strip().rsplit("/", 1)[-1]
    assert left.is_dir() and left.name.startswith(f".stage.tmp-{platform.node()}-")
    other_host = tmp_path / ".stage.tmp-elsewhere-1"  # another node's pid: never touched
    other_host.mkdir()
    live = subprocess.Popen([sys.executable, "-c", _CHILD, str(final), "sleep"], stdout=subprocess.PIPE, text=True)
    try:
        running = Path(live.stdout.readline().strip())
        with atomic_dir(final) as out:
            (out / "done.txt").write_text("ok")
        assert not left.exists()
        assert running.is_dir() and other_host.is_dir()  # a live writer's folder stays
    finally:
        live.kill()
        live.wait()
    assert (final / "done.txt").read_text() == "ok"

def test_manifest_records_checksums_and_is_done(tmp_path):
    (tmp_path / "out.jsonl").write_text('{"a": 1}\n')
    fp = fingerprint("stage", {"x": 1})
    write_manifest(tmp_path, stage="format", fingerprint=fp, config={"k": 1}, outputs=["out.jsonl"], counts={"n": 1})
    m = read_manifest(tmp_path, "format")
    assert m["outputs"]["out.jsonl"] == hashlib.sha256(b'{"a": 1}\n').hexdigest()
    assert m["counts"] == {"n": 1} and m["config"] == {"k": 1}
    assert is_done(tmp_path, fp)
    assert not is_done(tmp_path, fingerprint("stage", {"x": 2}))


def test_read_manifest_names_missing_file(tmp_path):
    with pytest.raises(ManifestError, match=str(tmp_path / "manifest.json")):
        read_manifest(tmp_path, "tokenize")


def test_read_manifest_rejects_wrong_stage(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"stage": "corpus"}))
    with pytest.raises(ManifestError, match="expected 'tokenize'"):
        read_manifest(tmp_path, "tokenize")


def test_read_manifest_rejects_missing_output(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"stage": "format", "outputs": {"gone.jsonl": "0" * 64}}))
    with pytest.raises(ManifestError, match="gone.jsonl"):
        read_manifest(tmp_path, "format")
