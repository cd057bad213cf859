"""One run per stage folder / output prefix (issue 16, item 2): a second ``ipt`` run on a locked output fails at
once, naming the holder, and changes nothing; the kernel frees the lock when the holder dies (``kill -9``)."""

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.locks import HELD_ENV, LockHeld, exclusive_lock, lend_to_children

ROOT = Path(__file__).resolve().parents[1]

_HOLD = """
import sys, time
from data_prep.locks import exclusive_lock
with exclusive_lock(sys.argv[1], "test"):
    print("held", flush=True)
    time.sleep(120)
"""


def ipt(*args, env=None):
    return subprocess.run([sys.executable, "-m", "megatron_ipt.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env)


class Holder:
    """Another process holding the lock file ``path`` (as a running stage does) until it is killed."""

    def __init__(self, path: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def __enter__(self):
        return self.proc

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def _assert_names_holder(stderr: str, holder, lock: Path) -> None:
    assert "is in use by another run" in stderr and "Traceback" not in stderr, stderr
    assert f"host {platform.node()}, pid {holder.pid}" in stderr and f"flock {lock} true" in stderr
    assert len([line for line in stderr.splitlines() if "error" in line]) == 1


def test_a_second_corpus_run_fails_at_once_naming_the_holder_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    lock = run / ".corpus.lock"
    with Holder(lock) as holder:
        t0 = time.monotonic()
        r = ipt("corpus", "examples/quickstart.yaml", "--set", f"run_dir={run}")
        assert r.returncode == 2
        assert time.monotonic() - t0 < 30  # at once: no waiting for the holder
        _assert_names_holder(r.stderr, holder, lock)
        assert not (run / "corpus").exists()
    r = ipt("corpus", "examples/quickstart.yaml", "--set", f"run_dir={run}")  # the killed holder left no lock
    assert r.returncode == 0, r.stderr
    assert (run / "corpus" / "manifest.json").is_file() and not lock.exists()


def test_a_second_train_run_fails_before_moving_the_running_one_aside(tmp_path):
    from train_fixtures import make_tokenized_dir

    run = tmp_path / "run"
    make_tokenized_dir(run / "tokenized", train_docs=20, heldout_docs=4)
    (run / "train").mkdir()
    (run / "train" / "fingerprint").write_text("the running one\n")
    (run / "train" / "metrics.jsonl").write_text('{"iteration": 1}\n')
    with Holder(run / ".train.lock") as holder:
        r = ipt("train", "--set", f"run_dir={run}", "--set", "train.device=cpu", "--set", "model.preset=llama-test")
    assert r.returncode == 2
    _assert_names_holder(r.stderr, holder, run / ".train.lock")
    assert sorted(p.name for p in run.iterdir()) == [".train.lock", "tokenized", "train"]  # nothing moved aside
    assert (run / "train" / "metrics.jsonl").read_text() == '{"iteration": 1}\n'


def test_standalone_tokenize_locks_its_output_prefix(tmp_path, tiny_tokenizer_dir):
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "some text to tokenize"}) + "\n")
    prefix = tmp_path / "out" / "corpus"
    args = ["tokenize", "--input", str(tmp_path / "in.jsonl"), "--tokenizer", str(tiny_tokenizer_dir),
            "--output-prefix", str(prefix), "--workers", "1"]
    lock = prefix.with_name("corpus.lock")
    with Holder(lock) as holder:
        r = ipt(*args)
        assert r.returncode == 2
        _assert_names_holder(r.stderr, holder, lock)
        assert not prefix.with_name("corpus.bin").exists()
    from data_prep.tokenize import _shard_name

    shard_lock = prefix.with_name("corpus.shards") / f"{_shard_name(tmp_path / 'in.jsonl')}.lock"
    with Holder(shard_lock) as holder:  # an array task (--no-merge) tokenizing the same input file
        r = ipt(*args, "--no-merge")
        assert r.returncode == 2 and f"pid {holder.pid}" in r.stderr and "tokenizer shard" in r.stderr
    r = ipt(*args)
    assert r.returncode == 0, r.stderr
    assert prefix.with_name("corpus.bin").is_file() and not lock.exists() and not shard_lock.exists()


def test_the_lock_is_exclusive_within_a_process_and_removed_on_release(tmp_path):
    path = tmp_path / "x.lock"
    with exclusive_lock(path, "stage folder x") as held:
        assert held == path and json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(LockHeld, match=rf"stage folder x is in use by another run \(host .*, pid {os.getpid()},"):
            with exclusive_lock(path, "stage folder x"):
                pass
    assert not path.exists()
    with exclusive_lock(path, "stage folder x"):  # free again
        pass


def test_a_launcher_lends_its_lock_to_the_workers_it_starts(tmp_path):
    path = tmp_path / ".train.lock"
    child = [sys.executable, "-c", "import sys; from data_prep.locks import exclusive_lock\n"
             "with exclusive_lock(sys.argv[1], 'train stage folder'): print('worker ran')", str(path)]
    with exclusive_lock(path, "train stage folder"):
        refused = subprocess.run(child, capture_output=True, text=True)
        assert refused.returncode != 0 and "LockHeld" in refused.stderr
        with lend_to_children(path):
            lent = subprocess.run(child, capture_output=True, text=True)
        assert HELD_ENV not in os.environ
    assert lent.returncode == 0 and lent.stdout.strip() == "worker ran", lent.stderr
