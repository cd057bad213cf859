import json

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data_prep.errors import DataPrepError
from data_prep.tokenize import eod_id, load_tokenizer, read_texts, write_indexed_dataset


def test_indexed_dataset_holds_documents_with_one_eod_each(tmp_path, tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    texts = ["def f(x): return x", "The while statement is used for repeated execution.", "a"]
    counts = write_indexed_dataset(texts, tok, tmp_path / "ds")
    ds = IndexedDataset(str(tmp_path / "ds"))
    eod = eod_id(tok)
    assert len(ds) == 3
    for i, text in enumerate(texts):
        expected = tok(text, add_special_tokens=False)["input_ids"] + [eod]
        assert ds[i].tolist() == expected
        assert ds[i].dtype == np.uint16
    assert counts == {"documents": 3, "tokens": sum(len(ds[i]) for i in range(3))}
    assert ds.document_indices.tolist() == [0, 1, 2, 3]


def test_no_temporary_files_are_left(tmp_path, tiny_tokenizer_dir):
    write_indexed_dataset(["x y z"], load_tokenizer(tiny_tokenizer_dir), tmp_path / "ds")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]


def test_failure_mid_way_leaves_no_dataset(tmp_path, tiny_tokenizer_dir):
    def texts():
        yield "fine"
        raise RuntimeError("reader crashed")

    with pytest.raises(RuntimeError):
        write_indexed_dataset(texts(), load_tokenizer(tiny_tokenizer_dir), tmp_path / "ds")
    assert list(tmp_path.iterdir()) == []


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n{nope\n")
    with pytest.raises(DataPrepError, match=r"t.jsonl:2"):
        list(read_texts(p))


def test_unloadable_tokenizer_is_a_one_line_error(tmp_path):
    with pytest.raises(DataPrepError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path)
