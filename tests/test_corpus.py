import gzip
import hashlib
import json

import pytest

from data_prep.corpus import content_id, read_corpus
from data_prep.errors import DataPrepError
from megatron_ipt.config import CorpusConfig


def test_pydoc_topics_gives_70_documents_with_10_percent_heldout():
    docs, counts = read_corpus(CorpusConfig())
    assert counts["documents"] == 70
    assert counts["heldout_documents"] == 7
    assert {d["split"] for d in docs} == {"train", "heldout"}
    assert all(len(d["text"]) >= 500 for d in docs)


def test_split_is_deterministic_and_seeded():
    a, _ = read_corpus(CorpusConfig())
    b, _ = read_corpus(CorpusConfig())
    c, _ = read_corpus(CorpusConfig(seed=7))
    held = lambda docs: {d["id"] for d in docs if d["split"] == "heldout"}  # noqa: E731
    assert held(a) == held(b)
    assert held(a) != held(c)


def test_jsonl_malformed_lines_are_skipped_and_located(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text('{"text": "' + "a" * 20 + '"}\n{broken\n{"body": "x"}\n{"id": "d4", "text": "' + "b" * 20 + '"}\n')
    docs, counts = read_corpus(CorpusConfig(source="jsonl", paths=[str(p)], min_chars=10, heldout_fraction=0))
    assert [d["id"] for d in docs] == [content_id("a" * 20), "d4"]
    assert counts["skipped"] == {"malformed_json": 1, "missing_field_text": 1}
    assert counts["skipped_examples"][:2] == [f"{p}:2: malformed_json", f"{p}:3: missing_field_text"]


def test_a_lone_surrogate_is_skipped_and_counted_like_other_bad_lines(tmp_path):
    """Issue 16, item 11: JSON "\\ud800" parses to a str that UTF-8 cannot encode; it used to crash the stage."""
    p = tmp_path / "docs.jsonl"
    p.write_text('{"text": "' + "a" * 20 + '"}\n{"text": "' + "b" * 20 + '\\ud800"}\n'
                 '{"id": "\\udfff", "text": "' + "c" * 20 + '"}\n')
    docs, counts = read_corpus(CorpusConfig(source="jsonl", paths=[str(p)], min_chars=10, heldout_fraction=0))
    assert [d["text"] for d in docs] == ["a" * 20]
    assert counts["skipped"] == {"lone_surrogate": 2}
    assert counts["skipped_examples"] == [f"{p}:2: lone_surrogate", f"{p}:3: lone_surrogate"]
    with pytest.raises(DataPrepError, match=f"{p}:2: lone_surrogate"):
        read_corpus(CorpusConfig(source="jsonl", paths=[str(p)], min_chars=10, on_error="fail"))


def test_on_error_fail_stops_at_the_first_malformed_line_naming_it(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text('{"text": "' + "a" * 20 + '"}\n{broken\n')
    with pytest.raises(DataPrepError, match=f"{p}:2: malformed_json"):
        read_corpus(CorpusConfig(source="jsonl", paths=[str(p)], min_chars=10, on_error="fail"))


def test_ids_come_from_the_id_field_or_stably_from_the_content(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"doc": "x1", "body": "first document text"}, {"body": "second document text"},
        {"body": "second document text"},  # same text, no id: the same id, skipped as a duplicate
        {"doc": 7, "body": "third document text"}]) + "\n")
    cfg = CorpusConfig(source="jsonl", paths=[str(p)], text_field="body", id_field="doc", min_chars=5,
                       heldout_fraction=0)
    docs, counts = read_corpus(cfg)
    assert [d["id"] for d in docs] == ["x1", content_id("second document text"), "7"]
    assert counts["skipped"] == {"duplicate_text": 1} and counts["skipped_examples"] == [f"{p}:3: duplicate_text"]
    assert content_id("second document text") == "sha256:" + hashlib.sha256(b"second document text").hexdigest()[:16]


def test_zstd_jsonl_and_bad_utf8_lines(tmp_path):
    import zstandard

    lines = [json.dumps({"id": "a", "text": "alpha text here"}).encode(), b'{"id": "b", "text": "\xff\xfe"}',
             json.dumps({"id": "c", "text": "gamma text here"}).encode()]
    p = tmp_path / "docs.jsonl.zst"
    p.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))
    docs, counts = read_corpus(CorpusConfig(source="jsonl", paths=[str(p)], min_chars=5, heldout_fraction=0))
    assert [d["id"] for d in docs] == ["a", "c"]
    assert counts["skipped_examples"] == [f"{p}:2: not_utf8"]


def test_parquet_with_and_without_an_id_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["p1", "p2", "p3"], "text": ["one parquet doc", None, "three parquet doc"]}),
                   tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": ["a doc without id"]}), tmp_path / "b.parquet")
    docs, counts = read_corpus(CorpusConfig(source="parquet", paths=[str(tmp_path / "*.parquet")], min_chars=5,
                                            heldout_fraction=0))
    assert [d["id"] for d in docs] == ["p1", "p3", content_id("a doc without id")]
    assert counts["skipped_examples"] == [f"{tmp_path / 'a.parquet'}:row 2: missing_field_text"]
    with pytest.raises(DataPrepError, match="no column 'body'"):
        read_corpus(CorpusConfig(source="parquet", paths=[str(tmp_path / "a.parquet")], text_field="body"))


def test_a_folder_of_text_files_is_one_document_per_file(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "b.txt").write_text("second file\n\nwith two paragraphs")
    (tmp_path / "docs" / "sub" / "a.md").write_text("a file in a subfolder")
    (tmp_path / "docs" / ".hidden").write_text("not a document")
    (tmp_path / "docs" / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    docs, counts = read_corpus(CorpusConfig(source="text", paths=[str(tmp_path / "docs")], min_chars=5,
                                            heldout_fraction=0))
    assert [d["id"] for d in docs] == [str(tmp_path / "docs" / "b.txt"), str(tmp_path / "docs" / "sub" / "a.md")]
    assert docs[0]["text"] == "second file\n\nwith two paragraphs"
    assert counts["skipped"] == {"not_utf8": 1}


def test_gzip_jsonl_is_read(tmp_path):
    p = tmp_path / "docs.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write(json.dumps({"text": "hello world " * 5}) + "\n")
    docs, _ = read_corpus(CorpusConfig(source="jsonl", paths=[str(p)], min_chars=10))
    assert len(docs) == 1 and docs[0]["split"] == "train"


def test_empty_corpus_is_a_clear_error(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    with pytest.raises(DataPrepError, match="no documents"):
        read_corpus(CorpusConfig(source="jsonl", paths=[str(p)]))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataPrepError, match="matches no file"):
        read_corpus(CorpusConfig(source="jsonl", paths=[str(tmp_path / "nope*.jsonl")]))


def test_duplicate_ids_are_rejected(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"id": 1, "text": "aaaaaaaaaaaa"}\n{"id": 1, "text": "bbbbbbbbbbbb"}\n')
    with pytest.raises(DataPrepError, match="appears twice"):
        read_corpus(CorpusConfig(source="jsonl", paths=[str(p)], min_chars=5))
