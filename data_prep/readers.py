"""Streaming readers of text corpora for tokenization: JSONL (plain, ``.gz``, ``.zst``), Parquet and text files.

A reader never holds a whole file: it yields ``Batch``es of at most ``max_docs`` records or about
``max_bytes`` bytes. JSONL and text records stay raw bytes here (decoding and JSON parsing happen in the
tokenizer workers, in parallel); Parquet yields the text column's values. Every reader hashes the file's
bytes as it reads them (SHA-256 of the file as stored, compressed or not), for the manifest.

Text files (``.txt``, ``.txt.gz``, ``.txt.zst``) hold one document per line.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from data_prep.errors import DataPrepError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text")
COMPRESSIONS = (".gz", ".zst", ".zstd")


@dataclass
class Batch:
    """Records of one file: ``items`` are raw lines (``format`` 'jsonl' or 'text') or Parquet values ('values');
    ``first`` is the 1-based line (or row) number of the first item."""

    source: str
    format: str
    first: int
    items: list


def source_format(path: Path) -> tuple[str, str | None]:
    """``(format, compression)`` from the file name: format 'jsonl', 'text' or 'parquet'."""
    name = path.name.lower()
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), None)
    if compression:
        name = name[: -len(compression)]
    if name.endswith(".parquet"):
        return "parquet", None
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl", compression
    if name.endswith(TEXT_SUFFIXES):
        return "text", compression
    raise DataPrepError(f"{path}: unknown input format (expected .jsonl, .txt or .parquet, optionally .gz/.zst)")


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files matching the glob patterns (``**`` allowed), sorted per pattern, duplicates removed."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise DataPrepError(f"no input file matches {pattern}")
        files += [Path(m) for m in matches if Path(m) not in files]
    return files


class _HashingReader(io.RawIOBase):
    """A raw binary stream that hashes the bytes read through it."""

    def __init__(self, f) -> None:
        self.f = f
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        if n:
            self.sha.update(memoryview(b)[:n])
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


def _open_lines(path: Path, compression: str | None, hasher: _HashingReader):
    if compression == ".gz":
        return gzip.GzipFile(fileobj=io.BufferedReader(hasher, 1 << 20))
    if compression in (".zst", ".zstd"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(io.BufferedReader(hasher, 1 << 20)), 1 << 20)
    return io.BufferedReader(hasher, 1 << 20)


def read_batches(path: Path, text_field: str = "text", max_docs: int = 1024, max_bytes: int = 1 << 22,
                 checksum: dict | None = None) -> Iterator[Batch]:
    """Yield the file's records in batches; when done, ``checksum['sha256']`` holds the file's SHA-256."""
    fmt, compression = source_format(path)
    if fmt == "parquet":
        yield from _parquet_batches(path, text_field, max_docs, checksum)
        return
    hasher = _HashingReader(open(path, "rb", buffering=0))
    with _open_lines(path, compression, hasher) as f:
        items: list[bytes] = []
        size, first, lineno = 0, 1, 0
        for lineno, line in enumerate(f, 1):
            items.append(line)
            size += len(line)
            if len(items) >= max_docs or size >= max_bytes:
                yield Batch(str(path), fmt, first, items)
                items, size, first = [], 0, lineno + 1
        if items:
            yield Batch(str(path), fmt, first, items)
        f.read()  # drain, so the hash covers the whole file
    if checksum is not None:
        checksum["sha256"] = hasher.sha.hexdigest()


def _parquet_batches(path: Path, text_field: str, max_docs: int, checksum: dict | None) -> Iterator[Batch]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise DataPrepError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    first = 1
    for rb in pf.iter_batches(batch_size=max_docs, columns=[text_field]):
        values = rb.column(0).to_pylist()
        yield Batch(str(path), "values", first, values)
        first += len(values)
    if checksum is not None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        checksum["sha256"] = h.hexdigest()
