"""Megatron indexed datasets (``PREFIX.bin`` / ``PREFIX.idx``) written and merged in bounded memory.

The bytes are exactly those of megatron-core's ``IndexedDatasetBuilder`` (the writer behind Megatron-LM's
``tools/preprocess_data.py``) for one sequence per document: ``.bin`` holds the token ids back to back;
``.idx`` holds the header (``MMIDIDX``, version 1, dtype code), the sequence and document counts, the
int32 sequence lengths, the int64 byte offsets of the sequences and the int64 document indices. The
builder keeps Python lists of every length and computes the offsets in a Python loop; here the lengths are
numpy chunks and the ``.idx`` is written chunk by chunk, so a merge of many shards never holds a whole
index. ``tests/test_indexed.py`` checks the bytes against the builder's.

Publishing a pair (:func:`publish_pair`): both files are written under temporary names that carry the host and
the process id (``PREFIX.bin.HOST-PID.tmp``, so two writers of one prefix never share a temporary file), flushed
and fsynced; then the old ``PREFIX.idx`` is removed (and the removal made durable), the new ``.bin`` is
renamed into place, then the new ``.idx``, then the folder is fsynced. A crash at any point leaves the old
pair, or a ``.bin`` without an ``.idx`` (which every reader reports as a missing file and the tokenizer redoes),
never a new ``.bin`` beside an old ``.idx``. Temporary files that a killed writer of this host left are removed
by the next writer of the same prefix. ``data_prep.dataset_check`` checks a pair before training reads it.
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from data_prep import atomic

INDEX_HEADER = b"MMIDIDX\x00\x00"  # megatron.core.datasets.indexed_dataset._INDEX_HEADER
# megatron.core.datasets.indexed_dataset.DType codes
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7, np.uint16: 8}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
CHUNK = 1 << 20  # sequences per chunk when writing or merging an index


def token_dtype(vocab_size: int) -> type[np.number]:
    """Token dtype for a vocabulary size, as megatron-core's ``DType.optimal_dtype``."""
    return np.uint16 if vocab_size < 65500 else np.int32


def write_index(idx_path: str | Path, dtype, count: int, length_chunks: Callable[[], Iterable[np.ndarray]]) -> None:
    """Write a ``.idx`` for ``count`` single-sequence documents; ``length_chunks()`` yields their lengths (twice)."""
    itemsize = np.dtype(dtype).itemsize
    with open(idx_path, "wb") as f:
        f.write(INDEX_HEADER)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", DTYPE_CODES[dtype]))
        f.write(struct.pack("<Q", count))
        f.write(struct.pack("<Q", count + 1))
        for chunk in length_chunks():
            np.asarray(chunk, dtype=np.int32).tofile(f)
        start = 0
        for chunk in length_chunks():
            nbytes = np.asarray(chunk, dtype=np.int64) * itemsize
            if len(nbytes):
                ends = np.cumsum(nbytes) + start
                (ends - nbytes).tofile(f)
                start = int(ends[-1])
        for lo in range(0, count + 1, CHUNK):
            np.arange(lo, min(lo + CHUNK, count + 1), dtype=np.int64).tofile(f)


def _host() -> str:
    return platform.node().replace("/", "_") or "host"


def temp_names(prefix: str | Path) -> tuple[str, str]:
    """This process's temporary ``(.bin, .idx)`` names for ``prefix``: ``PREFIX.bin.HOST-PID.tmp`` and the ``.idx``
    one. Temporary files of ``prefix`` that a process of this host which no longer runs left are removed first
    (another host's are never touched: its process ids mean nothing here)."""
    prefix, host = Path(prefix), _host()
    for ext in ("bin", "idx"):
        for stale in prefix.parent.glob(f"{glob.escape(prefix.name)}.{ext}.{glob.escape(host)}-*.tmp"):
            pid = stale.name[: -len(".tmp")].rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not atomic.pid_alive(int(pid)):
                stale.unlink(missing_ok=True)
    return tuple(f"{prefix}.{ext}.{host}-{os.getpid()}.tmp" for ext in ("bin", "idx"))


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_pair(bin_tmp: str, idx_tmp: str, prefix: str | Path) -> None:
    """Move the finished temporary files to ``PREFIX.bin`` / ``PREFIX.idx`` durably, in an order that never lets a
    reader see a new ``.bin`` beside an old ``.idx`` (module docstring): fsync both, remove the old ``.idx``
    (durably), rename the ``.bin``, rename the ``.idx``, fsync the folder."""
    _fsync_file(bin_tmp)
    _fsync_file(idx_tmp)
    folder = Path(prefix).parent
    idx = f"{prefix}.idx"
    if os.path.lexists(idx):
        os.remove(idx)
        atomic.fsync_dir(folder)
    os.replace(bin_tmp, f"{prefix}.bin")
    os.replace(idx_tmp, idx)
    atomic.fsync_dir(folder)


class IndexedDatasetWriter:
    """Append documents (token-id arrays) to a temporary ``.bin`` (:func:`temp_names`); ``finalize()`` writes the
    ``.idx`` and publishes the pair (:func:`publish_pair`); ``abort()`` removes the temporary files."""

    def __init__(self, prefix: str | Path, dtype) -> None:
        self.prefix = str(prefix)
        self.dtype = dtype
        self.bin_tmp, self.idx_tmp = temp_names(self.prefix)
        self._bin = open(self.bin_tmp, "wb", buffering=1 << 22)
        self._lengths: list[np.ndarray] = []
        self.documents = 0
        self.tokens = 0

    def add_documents(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Append ``len(lengths)`` documents whose ids lie back to back in ``ids`` (already of the dtype)."""
        assert ids.dtype == self.dtype
        ids.tofile(self._bin)
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self.documents += len(lengths)
        self.tokens += int(ids.size)

    def finalize(self) -> None:
        self._bin.close()
        write_index(self.idx_tmp, self.dtype, self.documents, lambda: self._lengths)
        publish_pair(self.bin_tmp, self.idx_tmp, self.prefix)

    def abort(self) -> None:
        self._bin.close()
        for p in (self.bin_tmp, self.idx_tmp):
            if os.path.exists(p):
                os.remove(p)


def read_index_header(prefix: str | Path) -> tuple[type[np.number], int, int]:
    """``(dtype, sequence_count, document_count)`` of ``prefix.idx``."""
    with open(f"{prefix}.idx", "rb") as f:
        head = f.read(9 + 8 + 1 + 8 + 8)
    if head[:9] != INDEX_HEADER:
        raise ValueError(f"{prefix}.idx is not a Megatron index")
    dtype = CODE_DTYPES[head[17]]
    seqs, docs = struct.unpack("<QQ", head[18:34])
    return dtype, seqs, docs


def _lengths(prefix: str | Path) -> np.ndarray:
    _, seqs, _ = read_index_header(prefix)
    return np.memmap(f"{prefix}.idx", dtype=np.int32, mode="r", offset=34, shape=(seqs,))


def _linked(prefixes: list, bin_tmp: str) -> bool:
    """One dataset: hard-link its ``.bin`` instead of copying it (shards are only ever replaced by rename, never
    written in place, so the link stays the merged data); False where links are not possible."""
    if len(prefixes) != 1:
        return False
    try:
        if os.path.exists(bin_tmp):
            os.remove(bin_tmp)
        os.link(f"{prefixes[0]}.bin", bin_tmp)
        return True
    except OSError:
        return False


def merge_datasets(prefixes: list[str | Path], out_prefix: str | Path) -> dict:
    """Concatenate single-sequence-per-document datasets into ``out_prefix`` (streamed; atomic rename)."""
    out_prefix = str(out_prefix)
    dtypes = {read_index_header(p)[0] for p in prefixes}
    if len(dtypes) > 1:
        raise ValueError(f"cannot merge datasets of different token dtypes: {sorted(d.__name__ for d in dtypes)}")
    dtype = dtypes.pop() if dtypes else np.int32
    for p in prefixes:
        _, seqs, docs = read_index_header(p)
        if docs != seqs + 1:
            raise ValueError(f"{p}: not one sequence per document")
    count = sum(read_index_header(p)[1] for p in prefixes)

    def chunks() -> Iterator[np.ndarray]:
        for p in prefixes:
            lengths = _lengths(p)
            for lo in range(0, len(lengths), CHUNK):
                yield np.array(lengths[lo:lo + CHUNK])

    bin_tmp, idx_tmp = temp_names(out_prefix)
    try:
        if not _linked(prefixes, bin_tmp):
            with open(bin_tmp, "wb") as out:
                for p in prefixes:
                    with open(f"{p}.bin", "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 24)
        write_index(idx_tmp, dtype, count, chunks)
    except BaseException:
        for p in (bin_tmp, idx_tmp):
            if os.path.exists(p):
                os.remove(p)
        raise
    publish_pair(bin_tmp, idx_tmp, out_prefix)
    tokens = os.path.getsize(f"{out_prefix}.bin") // np.dtype(dtype).itemsize
    return {"documents": count, "tokens": int(tokens)}
