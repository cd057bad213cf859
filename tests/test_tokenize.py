import base64
import gzip
import hashlib
import json

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from data_prep.encoders import load_encoder
from data_prep.errors import DataPrepError
from data_prep.tokenize import TokenizeOptions, main, tokenize_corpus

TEXTS = ["def f(x): return x", "The while statement is used for repeated execution.", "a", "ünïcödé ✓ text"]
PARALLEL = dict(workers=2, min_parallel_bytes=0, batch_docs=2)


def write_jsonl(path, texts, field="text", opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, field: t}) + "\n")
    return path


def direct(tokenizer_dir, texts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return [tok(t, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|endoftext|>")] for t in texts]


def test_output_is_byte_identical_to_megatron_builder_and_matches_direct_tokenization(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "in.jsonl", TEXTS * 5)
    m = tokenize_corpus([src], tmp_path / "ours", tiny_tokenizer_dir, TokenizeOptions(**PARALLEL), log=lambda _: None)
    expected = direct(tiny_tokenizer_dir, TEXTS * 5)
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for ids in expected:
        builder.add_document(np.array(ids), [len(ids)])
    builder.finalize(str(tmp_path / "ref.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"ref.{ext}").read_bytes()
    ds = IndexedDataset(str(tmp_path / "ours"))
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    assert ds.document_indices.tolist() == list(range(len(expected) + 1))
    assert m["documents"] == 20 and m["tokens"] == sum(map(len, expected)) and m["workers"] == 2
    assert m["tokenizer"]["dtype"] == "uint16" and len(m["tokenizer"]["fingerprint"]) == 64


def test_every_input_format_gives_the_same_tokens(tmp_path, tiny_tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    files = [write_jsonl(tmp_path / "a.jsonl", TEXTS),
             write_jsonl(tmp_path / "b.jsonl.gz", TEXTS, opener=gzip.open),
             write_jsonl(tmp_path / "c.jsonl", TEXTS, field="content")]
    (tmp_path / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress((tmp_path / "a.jsonl").read_bytes()))
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "e.parquet")
    (tmp_path / "f.txt").write_text("\n".join(TEXTS) + "\n")
    expected = direct(tiny_tokenizer_dir, TEXTS)
    for name in ("a.jsonl", "b.jsonl.gz", "d.jsonl.zst", "e.parquet", "f.txt"):
        tokenize_corpus([tmp_path / name], tmp_path / f"out-{name}", tiny_tokenizer_dir, log=lambda _: None)
        ds = IndexedDataset(str(tmp_path / f"out-{name}"))
        assert [ds[i].tolist() for i in range(len(ds))] == expected, name
    tokenize_corpus([files[2]], tmp_path / "field", tiny_tokenizer_dir, TokenizeOptions(text_field="content"),
                    log=lambda _: None)
    assert len(IndexedDataset(str(tmp_path / "field"))) == len(TEXTS)


def test_globs_give_one_shard_per_file_merged_with_checksums(tmp_path, tiny_tokenizer_dir):
    for i in range(3):
        write_jsonl(tmp_path / f"part-{i}.jsonl", TEXTS[i:])
    m = tokenize_corpus([str(tmp_path / "part-*.jsonl")], tmp_path / "out" / "corpus", tiny_tokenizer_dir,
                        TokenizeOptions(**PARALLEL), log=lambda _: None)
    assert [s["documents"] for s in m["sources"]] == [4, 3, 2]
    for s in m["sources"]:
        assert s["sha256"] == hashlib.sha256(open(s["path"], "rb").read()).hexdigest()
        assert len(IndexedDataset(s["shard"])) == s["documents"]
    ds = IndexedDataset(str(tmp_path / "out" / "corpus"))
    assert len(ds) == 9 and ds[4].tolist() == direct(tiny_tokenizer_dir, [TEXTS[1]])[0]
    assert json.loads((tmp_path / "out" / "corpus.manifest.json").read_text())["tokens"] == m["tokens"]


def bad_file(tmp_path):
    p = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": "fine"}).encode(), b"{nope", json.dumps({"other": 1}).encode(),
             json.dumps({"text": 3}).encode(), b'{"text": "caf\xe9"}', json.dumps({"text": "  "}).encode(),
             b"", json.dumps({"text": "also fine"}).encode()]
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


def test_progress_lines_go_to_stderr_for_long_runs_and_a_quick_run_stays_quiet(tmp_path, tiny_tokenizer_dir, capfd,
                                                                                monkeypatch):
    """Redirected output (Slurm, nohup) gets plain progress lines (files, documents/s, tokens/s) on stderr once a
    run lasts an interval (IPT_PROGRESS_SECONDS; 0 here); a run shorter than the interval prints none."""
    for i in range(3):
        write_jsonl(tmp_path / f"part-{i}.jsonl", TEXTS[i:])
    monkeypatch.setenv("IPT_PROGRESS_SECONDS", "0")
    tokenize_corpus([str(tmp_path / "part-*.jsonl")], tmp_path / "a" / "corpus", tiny_tokenizer_dir, log=lambda _: None)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tokenize corpus: ")]
    counts = [line.split(" | ")[0] for line in lines]  # a line per batch and per file at interval 0
    assert {"tokenize corpus: 1/3 files (33%)", "tokenize corpus: 2/3 files (67%)"} <= set(counts), err
    assert counts[-1] == "tokenize corpus: 3/3 files (100%)" and counts.count(counts[-1]) == 1, err
    assert "documents/s" in lines[-1] and "tokens/s" in lines[-1]
    monkeypatch.setenv("IPT_PROGRESS_SECONDS", "3600")
    tokenize_corpus([str(tmp_path / "part-*.jsonl")], tmp_path / "b" / "corpus", tiny_tokenizer_dir, log=lambda _: None)
    assert "tokenize corpus" not in capfd.readouterr().err


def test_bad_records_are_skipped_and_counted_by_reason_with_file_and_line(tmp_path, tiny_tokenizer_dir):
    m = tokenize_corpus([bad_file(tmp_path)], tmp_path / "out", tiny_tokenizer_dir, log=lambda _: None)
    assert m["documents"] == 2
    assert m["skipped"] == {"malformed_json": 1, "missing_field": 2, "not_utf8": 1, "empty_text": 1}
    assert m["skipped_examples"][0].endswith("bad.jsonl:2: not valid JSON")
    assert any(e.endswith("bad.jsonl:5: not UTF-8") for e in m["skipped_examples"])


def test_bad_input_fail_names_file_and_line_and_leaves_no_dataset(tmp_path, tiny_tokenizer_dir):
    with pytest.raises(DataPrepError, match=r"bad.jsonl:2: not valid JSON"):
        tokenize_corpus([bad_file(tmp_path)], tmp_path / "out", tiny_tokenizer_dir, TokenizeOptions(bad_input="fail"),
                        log=lambda _: None)
    assert not any(p.suffix in (".bin", ".idx", ".tmp") for p in tmp_path.rglob("*"))


def test_rerun_skips_finished_shards_and_redoes_changed_ones(tmp_path, tiny_tokenizer_dir):
    a, b = write_jsonl(tmp_path / "a.jsonl", TEXTS), write_jsonl(tmp_path / "b.jsonl", TEXTS[:2])
    first = tokenize_corpus([a, b], tmp_path / "out", tiny_tokenizer_dir, log=lambda _: None)
    assert first["shards_resumed"] == 0
    again = tokenize_corpus([a, b], tmp_path / "out", tiny_tokenizer_dir, log=lambda _: None)
    assert again["shards_resumed"] == 2 and again["tokens"] == first["tokens"]
    write_jsonl(b, TEXTS[:1])
    changed = tokenize_corpus([a, b], tmp_path / "out", tiny_tokenizer_dir, log=lambda _: None)
    assert changed["shards_resumed"] == 1 and changed["documents"] == 5
    assert len(IndexedDataset(str(tmp_path / "out"))) == 5


def test_a_crash_mid_file_leaves_nothing_under_a_final_name(tmp_path, tiny_tokenizer_dir, monkeypatch):
    import data_prep.tokenize as t

    calls = []

    def crash(batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("worker died")
        return real(batch)

    real = t.encode_batch
    monkeypatch.setattr(t, "encode_batch", crash)
    src = write_jsonl(tmp_path / "in.jsonl", TEXTS)
    with pytest.raises(RuntimeError, match="worker died"):
        tokenize_corpus([src], tmp_path / "out", tiny_tokenizer_dir, TokenizeOptions(batch_docs=2), log=lambda _: None)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["in.jsonl"]


def test_token_ids_beyond_the_dtype_are_an_error(tmp_path, tiny_tokenizer_dir, monkeypatch):
    from data_prep import encoders

    monkeypatch.setattr(encoders.HFEncoder, "encode_batch", lambda self, texts: [[70000] for _ in texts])
    with pytest.raises(DataPrepError, match="does not fit uint16"):
        tokenize_corpus([write_jsonl(tmp_path / "in.jsonl", TEXTS)], tmp_path / "out", tiny_tokenizer_dir,
                        TokenizeOptions(bpe_backend="tokenizers"), log=lambda _: None)


def test_bos_is_prepended_when_asked(tmp_path):
    # a tiktoken-style rank file of the 256 bytes: ids are the bytes; Llama-3 specials follow (BOS 256, EOD 257)
    rank_file = tmp_path / "tokenizer.model"
    rank_file.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    enc = load_encoder(rank_file)
    assert (enc.kind, enc.vocab_size, enc.bos_id, enc.eod_id) == ("tiktoken", 512, 256, 257)
    tokenize_corpus([write_jsonl(tmp_path / "in.jsonl", ["hi"])], tmp_path / "out", rank_file,
                    TokenizeOptions(append_bos=True), log=lambda _: None)
    ds = IndexedDataset(str(tmp_path / "out"))  # keep it alive: its items are views of its memory map
    assert ds[0].tolist() == [256, ord("h"), ord("i"), 257]


def test_sentencepiece_model_is_supported(tmp_path):
    import sentencepiece as spm
    from pydoc_data.topics import topics

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(list(topics.values())[:20]))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=300,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    tokenize_corpus([write_jsonl(tmp_path / "in.jsonl", TEXTS)], tmp_path / "out", tmp_path / "sp.model",
                    log=lambda _: None)
    ds = IndexedDataset(str(tmp_path / "out"))
    assert [ds[i].tolist() for i in range(len(ds))] == [sp.encode(t) + [sp.eos_id()] for t in TEXTS]


def test_unloadable_tokenizer_is_a_one_line_error(tmp_path):
    with pytest.raises(DataPrepError, match="cannot load a tokenizer"):
        load_encoder(tmp_path)


@pytest.mark.parametrize("files, reason", [
    ({"README.md": "notes"}, "ValueError: Couldn't instantiate the backend tokenizer from one of: (1) a `tokenizers` "
                             "library serialization file, (2) a slow tokenizer instance"),
    ({"config.json": '{"model_type": "gpt2"}'}, "transformers makes a GPT2Tokenizer of 1 token(s) that encodes text to "
                                                "nothing"),
])
def test_a_tokenizer_folder_without_tokenizer_files_is_one_line_keeping_the_library_reason(tmp_path, capsys, files,
                                                                                            reason):
    """Issue 16, item 9: the library's reason used to be cut at its first line ("... from one of: "), and a folder
    holding only a model's config.json loaded as a tokenizer that encodes every text to nothing."""
    from megatron_ipt.cli import main as ipt

    folder = tmp_path / "model"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    write_jsonl(tmp_path / "in.jsonl", TEXTS)
    assert ipt(["tokenize", "--input", str(tmp_path / "in.jsonl"), "--tokenizer", str(folder),
                "--output-prefix", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"cannot load a tokenizer from {folder}: {reason}" in err
    assert f"{folder} holds no tokenizer file: expected tokenizer.json" in err
    assert f"it holds {', '.join(files)})" in err
    assert not (tmp_path / "out.bin").exists()


def test_command_line_tokenizes_a_glob(tmp_path, tiny_tokenizer_dir, capsys):
    write_jsonl(tmp_path / "x.jsonl", TEXTS)
    rc = main(["--input", str(tmp_path / "*.jsonl"), "--tokenizer", str(tiny_tokenizer_dir),
               "--output-prefix", str(tmp_path / "out" / "c")])
    assert rc == 0 and "4 documents" in capsys.readouterr().out
    assert main(["--input", str(tmp_path / "none*.jsonl"), "--tokenizer", str(tiny_tokenizer_dir),
                 "--output-prefix", str(tmp_path / "c")]) == 2


@pytest.mark.parametrize("content, skipped", [("", None), ('{"text": ""}\n{broken\n', "every record was skipped")])
def test_an_input_without_documents_fails_with_no_documents_and_writes_nothing(tmp_path, tiny_tokenizer_dir,
                                                                                 capsys, content, skipped):
    """Issue 16, item 9: it used to write a 0-byte .bin that megatron-core cannot open."""
    from megatron_ipt.cli import main as ipt

    (tmp_path / "empty.jsonl").write_text(content)
    assert ipt(["tokenize", "--input", str(tmp_path / "empty.jsonl"), "--tokenizer", str(tiny_tokenizer_dir),
                "--output-prefix", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"no documents in {tmp_path / 'empty.jsonl'}" in err and "out.bin/.idx not written" in err
    assert (skipped or "every record") in err if skipped else "skipped" not in err
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.idx").exists()


def test_ipt_tokenize_standalone_array_tasks_then_merge_only(tmp_path, tiny_tokenizer_dir, capsys):
    from megatron_ipt.cli import main as ipt

    for i in range(3):
        write_jsonl(tmp_path / f"part-{i}.jsonl", [f"{t} {i}" for t in TEXTS])
    glob = str(tmp_path / "part-*.jsonl")
    common = ["--tokenizer", str(tiny_tokenizer_dir), "--output-prefix", str(tmp_path / "out")]
    # merge-only before the shards exist names the first unfinished input
    assert ipt(["tokenize", "--input", glob, *common, "--merge-only"]) == 2
    assert "part-0.jsonl: no finished shard" in capsys.readouterr().err
    for i in range(3):  # one "array task" per file
        assert ipt(["tokenize", "--input", str(tmp_path / f"part-{i}.jsonl"), *common, "--no-merge"]) == 0
    assert not (tmp_path / "out.bin").exists()
    assert ipt(["tokenize", "--input", glob, *common, "--merge-only"]) == 0
    assert ipt(["tokenize", "--input", glob, "--tokenizer", str(tiny_tokenizer_dir),
                "--output-prefix", str(tmp_path / "direct")]) == 0
    for ext in ("bin", "idx"):
        assert (tmp_path / f"out.{ext}").read_bytes() == (tmp_path / f"direct.{ext}").read_bytes()
    # a config and standalone options together, or an incomplete standalone call, are one-line errors
    assert ipt(["tokenize", "examples/quickstart.yaml", "--input", glob, *common]) == 2
    assert "not both" in capsys.readouterr().err
    assert ipt(["tokenize", "--input", glob]) == 2
    assert "needs --input, --tokenizer and --output-prefix" in capsys.readouterr().err


def test_tokenize_sbatch_script_array_tasks_and_merge(tmp_path, tiny_tokenizer_dir):
    """The sbatch script's own logic, run as Slurm would run its tasks (without a cluster: the
    array index comes from the environment); file names with spaces and quotes stay intact."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    data = tmp_path / "my corpus"
    data.mkdir()
    for i in range(2):
        write_jsonl(data / f"part '{i}'.jsonl", [f"{t} {i}" for t in TEXTS])
    venv = Path(sys.executable).parents[1]
    env = {**os.environ, "INPUT_GLOB": str(data / "part*.jsonl"), "TOKENIZER": str(tiny_tokenizer_dir),
           "OUTPUT_PREFIX": str(tmp_path / "out $(x)"), "IPT_VENV": str(venv), "SLURM_CPUS_PER_TASK": "1",
           "SLURM_SUBMIT_DIR": str(repo)}
    env.pop("SLURM_ARRAY_JOB_ID", None)
    for task in ("0", "1", "2"):  # task 2 has no file: nothing to do
        r = subprocess.run(["bash", str(repo / "slurm/tokenize.sbatch")], env={**env, "SLURM_ARRAY_TASK_ID": task},
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert not (tmp_path / "out $(x).bin").exists()
    r = subprocess.run(["bash", str(repo / "slurm/tokenize.sbatch")], env={**env, "IPT_TOKENIZE_MERGE": "1"},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "out $(x).manifest.json").read_text())
    assert m["documents"] == 2 * len(TEXTS) and m["shards_resumed"] == 2
