"""Indexed datasets are checked before training reads them (a short ``.bin``, an ``.idx`` of another dataset, a
file replaced after it was recorded), and the writer never leaves a new ``.bin`` beside an old ``.idx``."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from data_prep.dataset_check import IndexedDatasetError, check_dataset, check_with_manifest
from data_prep.indexed import IndexedDatasetWriter, temp_names
from data_prep.tokenize import tokenize_corpus
from megatron_ipt.manifest import ManifestError, file_record, verify_outputs, write_manifest

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import make_tokenized_dir, tiny_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def write(prefix, docs, dtype=np.int32):
    w = IndexedDatasetWriter(prefix, dtype)
    w.add_documents(np.array([t for d in docs for t in d], dtype=dtype), np.array([len(d) for d in docs]))
    w.finalize()


def truncate(path: Path, nbytes: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - nbytes)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_builder_output_passes_and_is_counted_as_megatron_reads_it(tmp_path, dtype):
    docs = [[5, 6, 7], [1], [700, 2, 3, 4], []]
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=dtype)
    for d in docs:
        builder.add_document(np.array(d, dtype=np.int64), [len(d)])
    builder.finalize(str(tmp_path / "ref.idx"))
    info = check_dataset(tmp_path / "ref")
    ds = IndexedDataset(str(tmp_path / "ref"))
    assert (info.dtype, info.sequences, info.documents) == (dtype, len(ds), len(ds.document_indices) - 1)
    assert info.tokens == int(ds.sequence_lengths.sum()) == 8


def test_a_bin_a_few_bytes_short_is_named_with_expected_and_found(tmp_path):
    write(tmp_path / "d", [[1, 2, 3], [4, 5]])
    truncate(tmp_path / "d.bin", 3)
    with pytest.raises(IndexedDatasetError, match=rf"^{tmp_path}/d.bin: 17 bytes, expected 20 \(5 tokens of int32 in "
                                                  rf"{tmp_path}/d.idx\): the .bin is truncated"):
        check_dataset(tmp_path / "d")


def test_an_idx_of_another_dataset_is_found_by_size_or_by_the_record(tmp_path, tiny_tokenizer_dir):
    write(tmp_path / "a", [[1, 2, 3], [4, 5]])
    write(tmp_path / "b", [[1, 2], [3, 4], [5, 6]])
    shutil.copy(tmp_path / "b.idx", tmp_path / "a.idx")
    with pytest.raises(IndexedDatasetError, match=r"a.bin: 20 bytes, expected 24 \(6 tokens"):
        check_dataset(tmp_path / "a")
    # same tokens, other boundaries: the sizes agree, the tokenizer's record does not
    for name, texts in (("one", ["alpha beta", "gamma"]), ("two", ["gamma", "alpha beta"])):
        src = tmp_path / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        tokenize_corpus([src], tmp_path / name, tiny_tokenizer_dir, log=lambda _: None)
    shutil.copy(tmp_path / "two.idx", tmp_path / "one.idx")
    assert check_dataset(tmp_path / "one").tokens == check_dataset(tmp_path / "two").tokens
    with pytest.raises(IndexedDatasetError, match=rf"^{tmp_path}/one.idx: sampled BLAKE2b \w+, "
                                                  rf"{tmp_path}/one.manifest.json records \w+ \(same size"):
        check_with_manifest(tmp_path / "one")


@pytest.mark.parametrize("damage, message", [
    (lambda idx: truncate(idx, 8), r"d.idx: \d+ bytes, expected \d+ for the 2 sequences and 2 documents"),
    (lambda idx: idx.write_bytes(b"not an index at all, no" * 3), r"d.idx: not a Megatron index"),
    (lambda idx: idx.write_bytes(b"MMIDIDX"), r"d.idx: 7 bytes, shorter than the 34-byte"),
    (lambda idx: idx.write_bytes(idx.read_bytes()[:17] + b"\x63" + idx.read_bytes()[18:]), r"unknown dtype code 99"),
])
def test_a_damaged_idx_is_one_line_naming_it(tmp_path, damage, message):
    write(tmp_path / "d", [[1, 2, 3], [4, 5]])
    damage(tmp_path / "d.idx")
    with pytest.raises(IndexedDatasetError, match=message):
        check_dataset(tmp_path / "d")


def test_file_record_samples_large_files_at_a_bounded_cost(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(20 << 20))
    before = file_record(big)
    assert before["bytes"] == 20 << 20
    with open(big, "r+b") as f:  # a byte in the last block (always sampled)
        f.seek((20 << 20) - 1)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    assert file_record(big)["sampled_blake2b"] != before["sampled_blake2b"]
    small = tmp_path / "small.idx"
    small.write_bytes(b"x" * 1000)
    first = file_record(small)
    small.write_bytes(b"x" * 500 + b"y" + b"x" * 499)  # whole file hashed below 8 MiB
    assert file_record(small)["sampled_blake2b"] != first["sampled_blake2b"]


def test_stage_manifest_outputs_are_verified_by_size_and_sampled_digest(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abcd")
    manifest = write_manifest(tmp_path, stage="tokenize", fingerprint="f", config={}, outputs=["a.bin"])
    verify_outputs(tmp_path, manifest)
    (tmp_path / "a.bin").write_bytes(b"abce")
    with pytest.raises(ManifestError, match=r"a.bin: sampled BLAKE2b .*manifest.json records"):
        verify_outputs(tmp_path, manifest)
    (tmp_path / "a.bin").write_bytes(b"abc")
    with pytest.raises(ManifestError, match=r"a.bin: 3 bytes, .*manifest.json records 4 .*rerun the 'tokenize'"):
        verify_outputs(tmp_path, manifest)


def test_temporary_names_carry_host_and_pid_and_a_dead_writers_are_removed(tmp_path):
    bin_tmp, idx_tmp = temp_names(tmp_path / "d")
    host = platform.node().replace("/", "_")
    assert bin_tmp == f"{tmp_path}/d.bin.{host}-{os.getpid()}.tmp" and idx_tmp.endswith(f"-{os.getpid()}.tmp")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"d.bin.{host}-{dead.pid}.tmp"
    live = tmp_path / f"d.bin.{host}-{os.getppid()}.tmp"
    other_host = tmp_path / f"d.bin.elsewhere-{dead.pid}.tmp"
    for p in (stale, live, other_host):
        p.write_bytes(b"x")
    write(tmp_path / "d", [[1]])
    assert not stale.exists() and live.exists() and other_host.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".tmp") == ["d.bin", "d.idx"]


def test_a_crash_between_the_renames_never_leaves_a_new_bin_beside_an_old_idx(tmp_path, monkeypatch):
    write(tmp_path / "d", [[1, 2, 3]])
    real = os.replace

    def crash_on_idx(src, dst):
        if str(dst).endswith(".idx"):
            raise OSError("power lost")
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_idx)
    with pytest.raises(OSError, match="power lost"):
        write(tmp_path / "d", [[4, 5], [6]])
    monkeypatch.undo()
    assert not (tmp_path / "d.idx").exists()  # the old .idx went first: a missing file, never a mismatched pair
    with pytest.raises(FileNotFoundError, match=r"indexed dataset file missing: .*d.idx"):
        check_dataset(tmp_path / "d")


def test_a_damaged_finished_shard_is_tokenized_again_on_rerun(tmp_path, tiny_tokenizer_dir):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(20)))
    first = tokenize_corpus([src], tmp_path / "out", tiny_tokenizer_dir, log=lambda _: None)
    shard = next((tmp_path / "out.shards").glob("*.bin"))
    truncate(shard, 2)
    said = []
    again = tokenize_corpus([src], tmp_path / "out", tiny_tokenizer_dir, log=said.append)
    assert again["shards_resumed"] == 0 and again["tokens"] == first["tokens"]
    assert any("bytes, expected" in s and "tokenizing it again" in s for s in said)
    check_with_manifest(tmp_path / "out")


def test_training_refuses_a_short_bin_before_any_work_with_exit_2(tmp_path):
    run = tmp_path / "run"
    make_tokenized_dir(run / "tokenized", train_docs=20, heldout_docs=4)
    truncate(run / "tokenized" / "train_ipt.bin", 3)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "megatron_ipt.cli", "train", "--set", f"run_dir={run}",
                        "--set", "train.device=cpu", "--set", "model.preset=llama-test"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert "train_ipt.bin: " in line and "bytes, expected" in line and "Traceback" not in r.stderr
    assert not (run / "train" / "checkpoints").exists()


def test_training_refuses_an_output_changed_since_the_tokenize_manifest(tmp_path):
    from megatron_ipt.training.train import check_inputs

    tokenized = make_tokenized_dir(tmp_path / "tokenized", train_docs=20, heldout_docs=4)
    names = [f"{n}.{e}" for n in ("train_raw", "train_ipt", "heldout_raw", "heldout_pairs") for e in ("bin", "idx")]
    write_manifest(tokenized, stage="tokenize", fingerprint="test", config={}, outputs=names,
                   tokenizer={"path": "synthetic", "vocab_size": 250, "eod_id": 0})
    check_inputs(tiny_config(), tokenized, None, launcher=True)
    shutil.copy(tokenized / "heldout_pairs.idx", tokenized / "heldout_raw.idx")  # same sizes: the record differs
    shutil.copy(tokenized / "heldout_pairs.bin", tokenized / "heldout_raw.bin")
    with pytest.raises(ManifestError, match=r"heldout_raw.bin: .*manifest.json records"):
        check_inputs(tiny_config(), tokenized, None, launcher=True)
