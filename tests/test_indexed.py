import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from data_prep.indexed import IndexedDatasetWriter, merge_datasets, token_dtype

DOCS = [[5, 6, 7], [1], [70000, 2, 3, 4], [9, 9]]


def builder_dataset(prefix, docs, dtype):
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for d in docs:
        b.add_document(np.array(d), [len(d)])
    b.finalize(f"{prefix}.idx")


def writer_dataset(prefix, docs, dtype):
    w = IndexedDatasetWriter(prefix, dtype)
    for half in (docs[:2], docs[2:]):
        w.add_documents(np.array([t for d in half for t in d], dtype=dtype), np.array([len(d) for d in half]))
    w.finalize()


def same_bytes(a, b):
    return all(open(f"{a}.{e}", "rb").read() == open(f"{b}.{e}", "rb").read() for e in ("bin", "idx"))


def test_token_dtype_follows_the_vocabulary_size():
    assert token_dtype(49152) is np.uint16 and token_dtype(128256) is np.int32


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_writer_bytes_equal_megatron_builder(tmp_path, dtype):
    docs = DOCS if dtype is np.int32 else [[t % 60000 for t in d] for d in DOCS]
    builder_dataset(tmp_path / "ref", docs, dtype)
    writer_dataset(tmp_path / "ours", docs, dtype)
    assert same_bytes(tmp_path / "ref", tmp_path / "ours")
    ds = IndexedDataset(str(tmp_path / "ours"))
    assert [ds[i].tolist() for i in range(len(ds))] == docs


def test_merge_equals_builder_add_index(tmp_path):
    writer_dataset(tmp_path / "a", DOCS, np.int32)
    writer_dataset(tmp_path / "b", DOCS[::-1], np.int32)
    b = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.int32)
    b.add_index(str(tmp_path / "a"))
    b.add_index(str(tmp_path / "b"))
    b.finalize(str(tmp_path / "ref.idx"))
    assert merge_datasets([tmp_path / "a", tmp_path / "b"], tmp_path / "m") == {"documents": 8, "tokens": 20}
    assert same_bytes(tmp_path / "ref", tmp_path / "m")


def test_merging_different_dtypes_is_refused(tmp_path):
    writer_dataset(tmp_path / "a", [[1]] * 4, np.int32)
    writer_dataset(tmp_path / "b", [[1]] * 4, np.uint16)
    with pytest.raises(ValueError, match="different token dtypes"):
        merge_datasets([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
