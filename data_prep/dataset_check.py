"""Cheap on-disk checks of a Megatron indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``) before training reads it.

megatron-core's reader (``megatron/core/datasets/indexed_dataset.py``, ``_IndexReader``) asserts only the magic and
the version and then trusts the ``.idx``: a ``.bin`` a few bytes short trains until a sample reaches past its end
(or silently, when the memory map rounds up), and an ``.idx`` of another dataset trains on wrong boundaries.
:func:`check_dataset` parses the header as that reader does (``MMIDIDX\\x00\\x00``, version 1, the dtype code, the
sequence and document counts; 34 bytes) and checks, without reading the ``.bin``:

- the ``.idx`` size is exactly the header plus ``int32`` lengths, ``int64`` pointers and ``int64`` document
  indices for those counts (plus one ``int8`` mode per sequence in the multimodal layout);
- the last document index is the sequence count, the lengths are not negative, and the last pointer plus the
  last length ends where the ``.bin`` ends;
- the ``.bin`` size is the sum of the sequence lengths times the dtype's item size.

The cost is one pass over the ``int32`` lengths (4 bytes per document) and two ``stat`` calls.

:func:`check_with_manifest` also compares the files with what their writer recorded in ``PREFIX.manifest.json``
(:func:`megatron_ipt.manifest.file_record`: the size and a BLAKE2b digest of the whole file up to 8 MiB, of 64
spread blocks of 64 KiB above): a replaced ``.idx`` or ``.bin`` of the same size is found too, at a cost that does
not grow with the file (a full hash of a multi-GB ``.bin`` on every start would take minutes). Both raise
:class:`IndexedDatasetError`, one line naming the file with what was expected and what was found.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.errors import DataPrepError
from data_prep.indexed import CHUNK, CODE_DTYPES, INDEX_HEADER
from megatron_ipt.manifest import record_mismatch

HEADER_BYTES = 34  # magic (9), version (8), dtype code (1), sequence count (8), document count (8)


class IndexedDatasetError(DataPrepError, ValueError):
    """An indexed dataset's files do not agree with each other or with their record; the message names the file."""


@dataclass(frozen=True)
class IndexInfo:
    """What :func:`check_dataset` read: the token dtype, the sequence and document counts (documents as megatron
    counts them: ``document_indices`` holds one more entry), the tokens, and the two files' sizes in bytes."""

    dtype: type
    sequences: int
    documents: int
    tokens: int
    idx_bytes: int
    bin_bytes: int


def _header(idx: str, size: int) -> tuple[type, int, int]:
    if size < HEADER_BYTES:
        raise IndexedDatasetError(f"{idx}: {size} bytes, shorter than the {HEADER_BYTES}-byte Megatron index header")
    with open(idx, "rb") as f:
        head = f.read(HEADER_BYTES)
    if head[:9] != INDEX_HEADER:
        raise IndexedDatasetError(f"{idx}: not a Megatron index (starts {head[:9]!r}, expected {INDEX_HEADER!r})")
    version, code = struct.unpack("<Q", head[9:17])[0], head[17]
    if version != 1:
        raise IndexedDatasetError(f"{idx}: index version {version}, expected 1")
    if code not in CODE_DTYPES:
        raise IndexedDatasetError(f"{idx}: unknown dtype code {code} (megatron-core's DType codes are 1-8)")
    sequences, documents = struct.unpack("<QQ", head[18:34])
    if documents < 1:
        raise IndexedDatasetError(f"{idx}: document count {documents} in the header, expected at least 1 (the "
                                  "document indices start with 0)")
    return CODE_DTYPES[code], sequences, documents - 1


def check_dataset(prefix: str | Path) -> IndexInfo:
    """Check ``prefix.idx`` against itself and ``prefix.bin`` (module docstring); return what it read.

    Raises FileNotFoundError naming a missing file and :class:`IndexedDatasetError` naming the file, expected vs
    found, for a pair that megatron-core would read wrongly."""
    idx, binf = f"{prefix}.idx", f"{prefix}.bin"
    for path in (binf, idx):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"indexed dataset file missing: {path}")
    idx_bytes, bin_bytes = os.path.getsize(idx), os.path.getsize(binf)
    dtype, seqs, docs = _header(idx, idx_bytes)
    expected = HEADER_BYTES + 4 * seqs + 8 * seqs + 8 * (docs + 1)
    if idx_bytes not in (expected, expected + seqs):
        raise IndexedDatasetError(f"{idx}: {idx_bytes} bytes, expected {expected} for the {seqs} sequences and "
                                  f"{docs} documents its header names (truncated, or not written by a Megatron writer)")
    lengths = np.memmap(idx, dtype=np.int32, mode="r", offset=HEADER_BYTES, shape=(seqs,)) if seqs else np.zeros(0)
    tokens = 0
    for lo in range(0, seqs, CHUNK):
        chunk = np.asarray(lengths[lo:lo + CHUNK], dtype=np.int64)
        if chunk.min() < 0:
            raise IndexedDatasetError(f"{idx}: a negative sequence length at sequence {lo + int(chunk.argmin())}")
        tokens += int(chunk.sum())
    itemsize = np.dtype(dtype).itemsize
    with open(idx, "rb") as f:
        f.seek(HEADER_BYTES + 12 * seqs + 8 * docs)
        last_document = struct.unpack("<q", f.read(8))[0]
        if seqs:
            f.seek(HEADER_BYTES + 12 * seqs - 8)
            last_pointer = struct.unpack("<q", f.read(8))[0]
    if last_document != seqs:
        raise IndexedDatasetError(f"{idx}: the last document index is {last_document}, expected the sequence count "
                                  f"{seqs}")
    if bin_bytes != tokens * itemsize:
        raise IndexedDatasetError(f"{binf}: {bin_bytes} bytes, expected {tokens * itemsize} ({tokens} tokens of "
                                  f"{np.dtype(dtype).name} in {idx}): the .bin is truncated or the .idx belongs to "
                                  "another dataset")
    if seqs and last_pointer + int(lengths[-1]) * itemsize != bin_bytes:
        raise IndexedDatasetError(f"{idx}: the last sequence ends at byte {last_pointer + int(lengths[-1]) * itemsize}"
                                  f", expected the end of {binf} ({bin_bytes})")
    return IndexInfo(dtype, seqs, docs, tokens, idx_bytes, bin_bytes)


def check_with_manifest(prefix: str | Path) -> IndexInfo:
    """:func:`check_dataset`, then, when ``PREFIX.manifest.json`` (the standalone tokenizer's or ``data_prep.sft``'s)
    records the files (``"files": {"NAME.bin": record, ...}``, :func:`megatron_ipt.manifest.file_record`), compares
    each (:func:`megatron_ipt.manifest.record_mismatch`). Raises FileNotFoundError or :class:`IndexedDatasetError`."""
    info = check_dataset(prefix)
    manifest = Path(f"{prefix}.manifest.json")
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text()).get("files") or {}
        except (OSError, ValueError, AttributeError):
            files = {}
        for name, record in files.items():
            if message := record_mismatch(manifest.parent / name, record, manifest):
                raise IndexedDatasetError(message)
    return info
