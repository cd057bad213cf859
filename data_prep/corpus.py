"""Raw corpora: read documents and assign each one to the train or held-out split.

Sources (``CorpusConfig.source``):
- ``pydoc_topics``: Python's own topic documentation, ``pydoc_data.topics.topics`` (shipped with every
  CPython, PSF license): about 70 documents over 500 characters, 0.46 M characters.
- ``jsonl``: JSON lines, plain or compressed (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``; also ``.json``/``.ndjson``),
  read by the tokenizer's streaming readers (``data_prep.readers``); the text is in ``text_field``.
- ``parquet``: Parquet files with a ``text_field`` column (and optionally an ``id_field`` column).
- ``text``: one document per file; a path that is a folder stands for every file under it (sorted); the id is
  the file path.

JSONL and Parquet ids come from ``id_field`` when the record has one, else from the text:
``sha256:`` + the first 16 hex digits of its SHA-256 (stable across runs and file layouts; a document whose
text repeats an earlier one's is skipped as ``duplicate_text``). A repeated explicit id is an error.

A malformed JSON line, a record without the text field, a non-string text or bytes that are not UTF-8 are
skipped and counted by reason, the first few reported with file:line (``on_error: skip``), or stop the stage
with file:line (``on_error: fail``). A corpus with no documents left is an error.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from data_prep.errors import DataPrepError
from data_prep.readers import read_batches

MAX_REPORTED = 5


@dataclass
class CorpusReport:
    """What reading a corpus skipped: counts by reason and the first few locations (file:line).

    ``fail``: raise DataPrepError at the first problem instead (``corpus.on_error: fail``)."""

    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    fail: bool = False

    def skip(self, reason: str, where: str) -> None:
        if self.fail:
            raise DataPrepError(f"{where}: {reason} (corpus.on_error is 'fail'; 'skip' skips and counts it)")
        self.note(reason, where)

    def note(self, reason: str, where: str) -> None:
        """Count a skipped item that is not an error under either policy (empty, short, duplicate text)."""
        self.skipped[reason] += 1
        if len(self.examples) < MAX_REPORTED:
            self.examples.append(f"{where}: {reason}")


def _expand(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in paths:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise DataPrepError(f"corpus path matches no file: {pattern}")
        for m in map(Path, matches):
            if m.is_dir():  # a folder: every file under it, hidden ones excepted
                files.extend(sorted(p for p in m.rglob("*") if p.is_file() and not p.name.startswith(".")))
            else:
                files.append(m)
    return files


def inputs_stamp(cfg) -> str | None:
    """A short hash of every file the corpus ``cfg`` (a ``CorpusConfig``) reads: path, size in bytes and
    modification time in ns (no content is read), so an added, removed, renamed or edited file changes it;
    None for ``pydoc_topics``. Raises DataPrepError when a path matches no file."""
    if cfg.source == "pydoc_topics" or not cfg.paths:
        return None
    h = hashlib.sha256()
    for path in _expand(cfg.paths):
        st = path.stat()
        h.update(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def content_id(text: str) -> str:
    """A stable id for a document without one: ``sha256:`` + the first 16 hex digits of its text's SHA-256."""
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _read_pydoc_topics() -> Iterator[tuple[str, str, str]]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield f"pydoc:{key}", topics[key], f"pydoc_data.topics[{key!r}]"


def _record_doc(record, where: str, text_field: str, id_field: str, report: CorpusReport):
    """``(id or None, text, where)`` of one parsed record, or None (reported) when it has no usable text."""
    if not isinstance(record, dict) or record.get(text_field) is None:
        report.skip(f"missing_field_{text_field}", where)
        return None
    text = record[text_field]
    if not isinstance(text, str):
        report.skip("text_not_a_string", where)
        return None
    doc_id = record.get(id_field)
    doc_id = None if doc_id is None else str(doc_id)
    if not _encodable(text) or (doc_id is not None and not _encodable(doc_id)):
        report.skip("lone_surrogate", where)  # JSON "\ud800" parses, but is no Unicode text: UTF-8 cannot hold it
        return None
    return doc_id, text, where


def _encodable(text: str) -> bool:
    """False for a string holding a lone UTF-16 surrogate (U+D800..U+DFFF), which no UTF-8 file can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_jsonl(files: list[Path], text_field: str, id_field: str, report: CorpusReport):
    for path in files:
        for batch in read_batches(path, text_field):
            for lineno, raw in enumerate(batch.items, batch.first):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    report.skip("not_utf8", where)
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    report.skip("malformed_json", where)
                    continue
                if (doc := _record_doc(record, where, text_field, id_field, report)) is not None:
                    yield doc


def _read_parquet(files: list[Path], text_field: str, id_field: str, report: CorpusReport):
    import pyarrow.parquet as pq

    for path in files:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if text_field not in names:
            raise DataPrepError(f"{path}: no column {text_field!r} (columns: {', '.join(names)})")
        columns = [text_field] + ([id_field] if id_field in names and id_field != text_field else [])
        row = 1
        for rb in pf.iter_batches(batch_size=1024, columns=columns):
            for record in rb.to_pylist():
                if (doc := _record_doc(record, f"{path}:row {row}", text_field, id_field, report)) is not None:
                    yield doc
                row += 1


def _read_text_files(files: list[Path], report: CorpusReport):
    for path in files:
        try:
            yield str(path), path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError:
            report.skip("not_utf8", str(path))


def _heldout_ids(ids: list[str], fraction: float, seed: int) -> set[str]:
    """Deterministic held-out set: the ``round(n * fraction)`` ids with the smallest seeded hash (at least
    one when ``fraction > 0`` and there are two or more documents)."""
    if fraction <= 0 or len(ids) < 2:
        return set()
    k = min(len(ids) - 1, max(1, round(len(ids) * fraction)))
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    return set(ranked[:k])


def read_corpus(cfg) -> tuple[list[dict], dict]:
    """Read the corpus described by ``cfg`` (a ``CorpusConfig``) and split it.

    Returns ``(documents, counts)``: documents are ``{"id": str, "split": "train"|"heldout", "text": str}``
    in source order; counts hold documents per split, characters, and skipped items by reason with the first
    few locations.

    Raises DataPrepError when a path matches no file, an explicit id repeats, no document is left, or (with
    ``on_error: fail``) at the first malformed record, naming its file:line.
    """
    report = CorpusReport(fail=getattr(cfg, "on_error", "skip") == "fail")
    text_field, id_field = cfg.text_field, getattr(cfg, "id_field", "id")
    if cfg.source == "pydoc_topics":
        items = _read_pydoc_topics()
    else:
        if not cfg.paths:
            raise DataPrepError(f"corpus.paths is empty: the {cfg.source} source needs at least one file, "
                                "folder or glob")
        files = _expand(cfg.paths)
        if cfg.source == "jsonl":
            items = _read_jsonl(files, text_field, id_field, report)
        elif cfg.source == "parquet":
            items = _read_parquet(files, text_field, id_field, report)
        else:
            items = _read_text_files(files, report)

    docs: list[dict] = []
    seen: set[str] = set()
    for doc_id, text, where in items:
        text = text.strip()
        if not text:
            report.note("empty_text", where)
            continue
        if len(text) < cfg.min_chars:
            report.skipped["shorter_than_min_chars"] += 1
            continue
        if doc_id is None:
            doc_id = content_id(text)
            if doc_id in seen:
                report.note("duplicate_text", where)
                continue
        elif doc_id in seen:
            raise DataPrepError(f"corpus: document id '{doc_id}' appears twice ({where}); ids must be unique")
        seen.add(doc_id)
        docs.append({"id": doc_id, "text": text})
        if cfg.max_documents is not None and len(docs) >= cfg.max_documents:
            break
    if not docs:
        raise DataPrepError(
            f"corpus ({cfg.source}) has no documents of at least {cfg.min_chars} characters"
            + (f"; skipped: {dict(report.skipped)}" if report.skipped else "")
        )
    heldout = _heldout_ids([d["id"] for d in docs], cfg.heldout_fraction, cfg.seed)
    documents = [{"id": d["id"], "split": "heldout" if d["id"] in heldout else "train", "text": d["text"]} for d in docs]
    counts = {
        "documents": len(documents),
        "train_documents": len(documents) - len(heldout),
        "heldout_documents": len(heldout),
        "characters": sum(len(d["text"]) for d in documents),
        "skipped": dict(report.skipped),
        "skipped_examples": report.examples,
    }
    return documents, counts
