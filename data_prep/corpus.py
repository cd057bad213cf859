"""Raw corpora: read documents and assign each one to the train or held-out split.

Sources (``CorpusConfig.source``):
- ``pydoc_topics``: Python's own topic documentation, ``pydoc_data.topics.topics`` (shipped with every
  CPython, PSF license): about 70 documents over 500 characters, 0.46 M characters.
- ``jsonl``: JSON lines (optionally ``.gz``) with a text field; ``id`` is taken from an ``id`` field when
  present, else ``{file stem}:{line number}``.
- ``text``: one document per plain-text file; the id is the file path.

A malformed JSON line, a line without the text field, or a non-string text is skipped, counted by
reason, and the first few are reported with file:line. A corpus with no documents left is an error.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from data_prep.errors import DataPrepError

MAX_REPORTED = 5


@dataclass
class CorpusReport:
    """What reading a corpus skipped: counts by reason and the first few locations (file:line)."""

    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < MAX_REPORTED:
            self.examples.append(f"{where}: {reason}")


def _expand(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in paths:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise DataPrepError(f"corpus path matches no file: {pattern}")
        files.extend(Path(m) for m in matches)
    return files


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8", errors="strict") if path.suffix == ".gz" else open(
        path, encoding="utf-8", errors="strict"
    )


def _read_pydoc_topics() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield f"pydoc:{key}", topics[key]


def _read_jsonl(files: list[Path], text_field: str, report: CorpusReport) -> Iterator[tuple[str, str]]:
    for path in files:
        with _open_text(path) as f:
            lineno = 0
            while True:
                try:
                    line = f.readline()
                except UnicodeDecodeError:
                    report.skip("not_utf8", f"{path}:{lineno + 1}")
                    break
                if not line:
                    break
                lineno += 1
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    report.skip("malformed_json", where)
                    continue
                if not isinstance(record, dict) or text_field not in record:
                    report.skip(f"missing_field_{text_field}", where)
                    continue
                text = record[text_field]
                if not isinstance(text, str):
                    report.skip("text_not_a_string", where)
                    continue
                doc_id = str(record["id"]) if "id" in record else f"{path.stem}:{lineno}"
                yield doc_id, text


def _read_text_files(files: list[Path], report: CorpusReport) -> Iterator[tuple[str, str]]:
    for path in files:
        try:
            yield str(path), path.read_text(encoding="utf-8")
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
    in source order; counts hold documents per split, characters, and skipped items by reason.

    Raises DataPrepError when a path matches no file, an id repeats, or no document is left.
    """
    report = CorpusReport()
    if cfg.source == "pydoc_topics":
        pairs = _read_pydoc_topics()
    elif cfg.source == "jsonl":
        if not cfg.paths:
            raise DataPrepError("corpus.paths is empty: the jsonl source needs at least one file or glob")
        pairs = _read_jsonl(_expand(cfg.paths), cfg.text_field, report)
    else:
        if not cfg.paths:
            raise DataPrepError("corpus.paths is empty: the text source needs at least one file or glob")
        pairs = _read_text_files(_expand(cfg.paths), report)

    docs: list[dict] = []
    seen: set[str] = set()
    for doc_id, text in pairs:
        text = text.strip()
        if not text:
            report.skip("empty_text", doc_id)
            continue
        if len(text) < cfg.min_chars:
            report.skipped["shorter_than_min_chars"] += 1
            continue
        if doc_id in seen:
            raise DataPrepError(f"corpus: document id '{doc_id}' appears twice; ids must be unique")
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
